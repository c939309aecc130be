"""RL prompt sets: every prompt keeps its own target (upstream bug B7 fixed), sampling as pandas."""

import numpy as np

from rec.data.dataset import Row, load_catalogue, read_split
from rec.data.rl import pandas_sample_order, rl_prompt_ids, rl_prompts


def _row(history_sids, item_sid, item_id=0):
    return Row("A1", ("t",) * len(history_sids), "x", (0,) * len(history_sids), item_id, tuple(history_sids), item_sid)


def test_duplicate_histories_keep_their_own_targets(synth_dataset_dir):
    cat = load_catalogue(synth_dataset_dir)
    s = cat.sids
    rows = [_row([s[0], s[1]], s[2]), _row([s[0], s[1]], s[3]), _row([s[4]], s[5])]
    got = rl_prompts(cat, rows, ["sid_next"])
    assert [p.target_sid for p in got] == [s[2], s[3], s[5]]
    assert got[0].text == got[1].text  # same prompt, different targets: upstream's dict kept one


def test_seq_title_sample_matches_pandas_sample():
    # pandas DataFrame.sample(n, random_state=seed) == RandomState(seed).choice(len, n, replace=False)
    for n_rows, n, seed in [(100, 10, 0), (37, 37, 5), (1000, 999, 42)]:
        expected = np.random.RandomState(seed).choice(n_rows, size=n, replace=False)
        np.testing.assert_array_equal(pandas_sample_order(n_rows, n, seed), expected)


def test_task_sizes_and_order(synth_dataset_dir):
    cat = load_catalogue(synth_dataset_dir)
    rows = read_split(synth_dataset_dir, "train")
    got = rl_prompts(cat, rows, ["sid_next", "title2sid", "seq_title2sid"], sample_seed=0, seq_title_sample=20)
    tasks = [p.task for p in got]
    n_desc = sum(1 for d in cat.descriptions if d)
    assert tasks == ["sid_next"] * len(rows) + ["title2sid"] * len(cat) + ["description2sid"] * n_desc + ["seq_title2sid"] * 20
    sampled = [p for p in got if p.task == "seq_title2sid"]
    order = pandas_sample_order(len(rows), 20, 0)
    assert [p.target_sid for p in sampled] == [rows[i].item_sid for i in order]
    everything = rl_prompts(cat, rows, ["seq_title2sid"], seq_title_sample=10**6)
    assert len(everything) == len(rows)
    for p in got:
        assert p.text.endswith("### Response:\n") and p.target_sid in cat.sid_to_ids


def test_prompt_ids_truncate_from_the_left(synth_tokenizer_dir, synth_dataset_dir):
    from rec.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(synth_tokenizer_dir)
    cat = load_catalogue(synth_dataset_dir)
    prompts = rl_prompts(cat, read_split(synth_dataset_dir, "valid", limit=3), ["sid_next"])
    full = rl_prompt_ids(tok, prompts, max_prompt_len=10**6)
    assert full == [encode(tok, p.text) for p in prompts]
    short = rl_prompt_ids(tok, prompts, max_prompt_len=8)
    assert short == [ids[-8:] for ids in full]
