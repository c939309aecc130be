"""`rec bench`: token-count estimate, FLOP accounting, and one tiny eval run printing one JSON object."""

import argparse
import json

import pytest

from rec.bench import (
    QWEN_BASE_VOCAB,
    beam_search_flops,
    estimate_qwen_tokens,
    peak_flops,
    run_bench,
    synthetic_prompt_ids,
)
from rec.errors import RecError


def test_estimate_qwen_tokens_hand_counted():
    # "Hello" " world" "," " " | <a_1> | <b_2> | "," " again" "\n\n" "###" " Response" ":\n"
    assert estimate_qwen_tokens("Hello world, <a_1><b_2>, again\n\n### Response:\n") == 12
    # upstream's trie assumes "### Response:\n" is exactly 3 Qwen tokens (reference §7.1)
    assert estimate_qwen_tokens("### Response:\n") == 3
    # digits are split one by one in Qwen2
    assert estimate_qwen_tokens("2024") == 4


def test_synthetic_ids_keep_sid_ids_and_length():
    import numpy as np

    text = "history: <a_1><b_2><c_3>, <a_1><b_2><c_4>\n"
    sid_ids = {"<a_1>": QWEN_BASE_VOCAB, "<b_2>": QWEN_BASE_VOCAB + 1, "<c_3>": QWEN_BASE_VOCAB + 2, "<c_4>": QWEN_BASE_VOCAB + 3}
    ids = synthetic_prompt_ids(text, sid_ids, np.random.default_rng(0))
    assert len(ids) == estimate_qwen_tokens(text)
    assert [i for i in ids if i >= QWEN_BASE_VOCAB] == [QWEN_BASE_VOCAB + k for k in (0, 1, 2, 0, 1, 3)]


def test_beam_search_flops_hand_computed():
    from rec.model.qwen2 import SHAPES, shape_with_vocab

    shape = shape_with_vocab(SHAPES["tiny"], 1000)
    # tiny: H=64, I=128, L=2, q_dim=64, kv_dim=32; per layer 64*64 + 2*64*32 + 64*64 + 3*64*128 = 36864
    # matmul params = 2*36864 + 64*1000 = 137728; forward per token = 2*137728 + 4*2*T*64
    per_token = lambda t: 2 * 137728 + 4 * 2 * t * 64  # noqa: E731
    expected = 10 * per_token(10) + 3 * 4 * per_token(14)
    assert beam_search_flops(shape, prompt_len=10, beams=3, fed_steps=4) == pytest.approx(expected)


def test_peak_flops_lookup():
    assert peak_flops("TPU v6 lite") == 918e12
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert peak_flops("cpu") is None


def _args(**kw):
    base = dict(what="eval", shape="tiny", beams=4, batch=2, data="", seq_len=64, prompt_len=32, gen_len=8,
                fast="auto", iters=1, dtype="float32")
    base.update(kw)
    return argparse.Namespace(**base)


def test_bench_eval_tiny_prints_one_json(synth_dataset_dir, capsys):
    result = run_bench(_args(data=synth_dataset_dir))
    printed = capsys.readouterr().out.strip().splitlines()
    assert len(printed) == 1 and json.loads(printed[0]) == result
    for key in ("samples_per_s", "invalid", "batch_size", "beams", "shape", "device", "compile_s"):
        assert key in result
    assert result["invalid"] == 0 and result["samples_per_s"] > 0
    assert result["batch_size"] == 2 and result["beams"] == 4 and result["vocab"] > QWEN_BASE_VOCAB
    # float32: decoding the batch one row at a time finds exactly the same ranked lists
    assert result["small_batch_size"] == 1 and result["small_batch_agreement"] == 1.0
    # one program for the timed batch shape (+ the small-batch check and setup), not one per call
    assert 1 <= result["xla_compiles"] <= 20
    assert result["host_peak_rss_gib"] > 0


def test_bench_errors(synth_dataset_dir):
    with pytest.raises(RecError, match="--data"):
        run_bench(_args(data=""))
    with pytest.raises(RecError, match="--shape: unknown shape"):
        run_bench(_args(data=synth_dataset_dir, shape="qwen9"))


def test_delegation_names_missing_module():
    from rec.bench import _delegate

    with pytest.raises(RecError, match=r"rec\.train\.no_such_module is missing \(it provides bench_x\(args\)\)"):
        _delegate("rec.train.no_such_module", "bench_x", _args(what="rollout"))
    with pytest.raises(RecError, match="has no bench_x"):
        _delegate("rec.eval.metrics", "bench_x", _args(what="rollout"))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "eval", "--beams", "0"], "argument --beams: must be >= 1, got 0"),
        (["bench", "sft", "--seq-len", "-4"], "argument --seq-len: must be >= 1, got -4"),
        (["bench", "sft", "--iters", "0"], "argument --iters: must be >= 1, got 0"),
        (["bench", "rl", "--batch", "x"], "argument --batch: expected an integer, got 'x'"),
    ],
)
def test_bad_bench_arguments_are_one_line_errors(argv, message, capsys):
    from rec.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].endswith(message)
