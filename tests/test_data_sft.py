"""SFT examples (tokenization, label masking, left truncation) and bucketed batches."""

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rec.data import prompts as P
from rec.data.dataset import category_phrase, load_catalogue, read_split
from rec.data.sft import (
    IGNORE,
    Example,
    batch_stream,
    batches_per_epoch,
    bucketed_batches,
    build_sft_examples,
    build_valid_examples,
    collate,
    eval_prompt_ids,
    left_pad,
    plan_epoch,
    tokenize_prompts,
)
from rec.errors import RecError


class CharTokenizer:
    """One token per character (id = code point), EOS = 0: expectations can be written by hand."""

    eos_token_id = 0

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        return {"input_ids": [[ord(c) for c in t] for t in texts]}


def test_tokenize_masks_prompt_and_appends_eos():
    prompt = P.Prompt(header="ab", body="cd", target="e\n", task="t")
    (ex,) = tokenize_prompts(CharTokenizer(), [prompt], max_len=100)
    assert ex.input_ids.tolist() == [97, 98, 99, 100, 101, 10, 0]
    assert ex.labels.tolist() == [IGNORE, IGNORE, IGNORE, IGNORE, 101, 10, 0]
    assert ex.task == "t"


def test_tokenize_truncates_from_the_left():
    prompt = P.Prompt(header="ab", body="cd", target="e\n", task="t")
    (ex,) = tokenize_prompts(CharTokenizer(), [prompt], max_len=5)
    assert ex.input_ids.tolist() == [99, 100, 101, 10, 0]
    assert ex.labels.tolist() == [IGNORE, IGNORE, 101, 10, 0]
    (short,) = tokenize_prompts(CharTokenizer(), [prompt], max_len=2)
    assert short.input_ids.tolist() == [10, 0] and short.labels.tolist() == [10, 0]


def test_header_and_body_are_tokenized_separately(synth_tokenizer_dir, synth_dataset_dir):
    from rec.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(synth_tokenizer_dir)
    cat = load_catalogue(synth_dataset_dir)
    rows = read_split(synth_dataset_dir, "train", limit=4)
    examples = build_sft_examples(tok, cat, rows, P.SFT_TASKS, category_phrase(synth_dataset_dir), seed=0, max_len=4096)
    prompt_list = [P.sid_next(r.history_sids, r.item_sid) for r in rows]
    for ex, p in zip(examples[:4], prompt_list, strict=True):
        prompt_ids = encode(tok, p.header) + encode(tok, p.body)
        target_ids = encode(tok, p.target) + [tok.eos_token_id]
        assert ex.input_ids.tolist() == prompt_ids + target_ids
        assert ex.labels.tolist() == [IGNORE] * len(prompt_ids) + target_ids
        # the target span decodes to "SID\n" and ends with "\n" then EOS
        assert tok.decode(target_ids[:-1]) == p.target
    assert {e.task for e in examples} == set(P.SFT_TASKS)
    valid = build_valid_examples(tok, rows, max_len=4096)
    assert [v.input_ids.tolist() for v in valid] == [e.input_ids.tolist() for e in examples[:4]]


def test_eval_prompt_ids_end_with_response_marker(synth_tokenizer_dir, synth_dataset_dir):
    from rec.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(synth_tokenizer_dir)
    cat = load_catalogue(synth_dataset_dir)
    rows = read_split(synth_dataset_dir, "test", limit=3)
    marker = encode(tok, "### Response:\n")
    for style in ("eval", "sft"):
        ids = eval_prompt_ids(tok, cat, rows, style=style)
        for row, seq in zip(rows, ids, strict=True):
            p = P.eval_prompt(row.history_sids, row.item_sid, style)
            assert seq == encode(tok, p.header) + encode(tok, p.body)
            assert seq[-len(marker):] == marker
    with pytest.raises(RecError, match="eval.prompt"):
        eval_prompt_ids(tok, cat, rows, style="chat")


def test_left_pad_by_hand():
    out = left_pad([[5, 6], [7, 8, 9, 10]], length=3, pad_id=1)
    assert out["input_ids"].tolist() == [[1, 5, 6], [8, 9, 10]]
    assert out["attention_mask"].tolist() == [[0, 1, 1], [1, 1, 1]]
    assert out["positions"].tolist() == [[0, 0, 1], [0, 1, 2]]


def _examples(lengths):
    out = []
    for i, n in enumerate(lengths):
        ids = np.arange(1, n + 1, dtype=np.int32) + 1000 * i
        labels = np.where(np.arange(n) >= n // 2, ids, IGNORE).astype(np.int32)
        out.append(Example(ids, labels, "t"))
    return out


BUCKET_SETS = [[8], [4, 8, 16], [3, 10, 32, 64]]


@settings(max_examples=60, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 80), min_size=1, max_size=40),
    batch_size=st.integers(1, 7),
    buckets=st.sampled_from(BUCKET_SETS),
    seed=st.integers(0, 3),
    epoch=st.integers(0, 3),
)
def test_bucketing_invariants(lengths, batch_size, buckets, seed, epoch):
    plan = plan_epoch(lengths, batch_size, buckets, seed, epoch)
    assert len(plan) == batches_per_epoch(lengths, batch_size, buckets)
    seen = []
    for planned in plan:
        assert planned.indices.shape == (batch_size,) and planned.weights.shape == (batch_size,)
        assert planned.length in buckets
        real = planned.indices[planned.weights == 1.0]
        assert real.size >= 1 and set(planned.weights.tolist()) <= {0.0, 1.0}
        # filler rows only at the end, copies of rows of the same batch
        assert np.all(np.diff(planned.weights) <= 0)
        assert set(planned.indices.tolist()) == set(real.tolist())
        for i in real:
            fitting = [b for b in buckets if b >= lengths[i]]
            assert planned.length == (fitting[0] if fitting else buckets[-1])
        seen.extend(real.tolist())
    assert sorted(seen) == list(range(len(lengths)))  # every example exactly once per epoch

    examples = _examples(lengths)
    pad = 7
    for planned, batch in zip(plan, bucketed_batches(examples, batch_size, buckets, seed, epoch, pad_id=pad), strict=True):
        L = planned.length
        for key in ("input_ids", "labels", "attention_mask", "positions"):
            assert batch[key].shape == (batch_size, L) and batch[key].dtype == np.int32
        assert batch["weights"].tolist() == planned.weights.tolist()
        for row, i in enumerate(planned.indices):
            n = min(lengths[i], L)
            mask = batch["attention_mask"][row]
            assert mask.tolist() == [0] * (L - n) + [1] * n
            assert np.all(batch["input_ids"][row, : L - n] == pad)
            assert np.all(batch["labels"][row, : L - n] == IGNORE)
            assert batch["input_ids"][row, L - n :].tolist() == examples[i].input_ids[-n:].tolist()
            assert batch["labels"][row, L - n :].tolist() == examples[i].labels[-n:].tolist()
            assert batch["positions"][row].tolist() == [0] * (L - n) + list(range(n))


def test_shuffle_is_deterministic_and_depends_on_epoch():
    lengths = [5, 9, 3, 12, 7, 7, 2, 30, 11, 4] * 3
    a = plan_epoch(lengths, 4, [8, 16, 32], seed=1, epoch=0)
    b = plan_epoch(lengths, 4, [8, 16, 32], seed=1, epoch=0)
    c = plan_epoch(lengths, 4, [8, 16, 32], seed=1, epoch=1)
    order = lambda plan: [p.indices.tolist() for p in plan]  # noqa: E731
    assert order(a) == order(b)
    assert order(a) != order(c)
    assert order(a) != order(plan_epoch(lengths, 4, [8, 16, 32], seed=2, epoch=0))


def test_stream_resumes_at_a_position():
    examples = _examples([5, 9, 3, 12, 7, 7, 2, 30, 11, 4, 6])
    kw = dict(batch_size=3, buckets=[8, 16, 32], seed=5, pad_id=0)
    per_epoch = batches_per_epoch([len(e) for e in examples], 3, [8, 16, 32])
    full = list(itertools.islice(batch_stream(examples, **kw), 3 * per_epoch))
    resume_at = per_epoch + 2  # inside the second epoch
    epoch, index, _ = full[resume_at]
    assert (epoch, index) == (1, 2)
    resumed = list(itertools.islice(batch_stream(examples, start=(epoch, index), **kw), len(full) - resume_at))
    for (e1, i1, b1), (e2, i2, b2) in zip(full[resume_at:], resumed, strict=True):
        assert (e1, i1) == (e2, i2)
        for key in b1:
            np.testing.assert_array_equal(b1[key], b2[key])
    one_epoch = list(bucketed_batches(examples, epoch=1, start_batch=2, **kw))
    assert len(one_epoch) == per_epoch - 2
    np.testing.assert_array_equal(one_epoch[0]["input_ids"], full[resume_at][2]["input_ids"])


def test_collate_filler_rows_have_zero_weight():
    examples = _examples([3, 3, 3, 3, 3])
    plan = plan_epoch([3] * 5, 4, [4], seed=0, epoch=0)
    weights = sorted(p.weights.sum() for p in plan)
    assert weights == [1.0, 4.0]
    last = next(p for p in plan if p.weights.sum() == 1.0)
    batch = collate(examples, last, pad_id=0)
    assert batch["weights"].tolist() == [1.0, 0.0, 0.0, 0.0]
    # the filler rows copy the real one (same bucket, same padding)
    assert all(batch["input_ids"][r].tolist() == batch["input_ids"][0].tolist() for r in range(4))


def test_bad_buckets_and_batch_size():
    with pytest.raises(RecError, match="data.length_buckets"):
        plan_epoch([3], 2, [16, 8], 0, 0)
    with pytest.raises(RecError, match="data.length_buckets"):
        plan_epoch([3], 2, [], 0, 0)
    with pytest.raises(RecError, match="train.batch_size"):
        plan_epoch([3], 0, [8], 0, 0)
    with pytest.raises(RecError, match="no training examples"):
        plan_epoch([], 2, [8], 0, 0)
