"""Training rows from an earlier split (`data.train_from`): prefix windows, de-duplication, the
held-out selection slice, and the config rule that the evaluated split is never a source."""

import random

import pytest

from rec.config import DataConfig, load_config
from rec.data.dataset import Row, read_split
from rec.data.windows import (
    consecutive_pairs,
    expand_windows,
    item_sequence,
    longest_sequences,
    prefix_windows,
    row_key,
    selection_count,
    split_for_selection,
    training_rows,
    windowed_rows,
)
from rec.errors import RecError


def _row(user: str, ids: list[int], target: int) -> Row:
    return Row(
        user_id=user,
        history_titles=tuple(f"t{i}" for i in ids),
        item_title=f"t{target}",
        history_ids=tuple(ids),
        item_id=target,
        history_sids=tuple(f"<a_{i}><b_0><c_0>" for i in ids),
        item_sid=f"<a_{target}><b_0><c_0>",
    )


def _random_rows(seed: int, n: int = 40) -> list[Row]:
    rng = random.Random(seed)
    rows = []
    for u in range(n):
        length = rng.randint(1, 6)
        ids = [rng.randint(0, 9) for _ in range(length)]  # small id space: many duplicate windows
        rows.append(_row(f"u{u % 7}", ids, rng.randint(0, 9)))
    return rows


def test_prefix_windows_of_one_row():
    row = _row("u", [1, 2, 3], 4)
    windows = prefix_windows(row)
    assert [(w.history_ids, w.item_id) for w in windows] == [((1,), 2), ((1, 2), 3), ((1, 2, 3), 4)]
    assert windows[-1] == row  # the last window is the row itself
    assert windows[0].history_titles == ("t1",) and windows[0].item_title == "t2"
    assert windows[1].history_sids == ("<a_1><b_0><c_0>", "<a_2><b_0><c_0>") and windows[1].item_sid == "<a_3><b_0><c_0>"


@pytest.mark.parametrize("seed", range(5))
def test_window_properties(seed):
    rows = _random_rows(seed)
    out = expand_windows(rows)
    keys = [row_key(r) for r in out]
    # no duplicates, and exactly the distinct (history, target) pairs of all windows
    assert len(keys) == len(set(keys))
    every = {row_key(w) for r in rows for w in prefix_windows(r)}
    assert set(keys) == every
    # count: without duplicates there would be sum(len(history)) windows
    assert len(out) <= sum(len(r.history_ids) for r in rows)
    # every source row is present, and every window is a prefix of some source sequence
    assert {row_key(r) for r in rows} <= set(keys)
    sequences = [(*r.history_ids, r.item_id) for r in rows]
    for w in out:
        seq = (*w.history_ids, w.item_id)
        assert any(s[: len(seq)] == seq for s in sequences)
    # deterministic order: first occurrence, row by row, shortest window first
    assert expand_windows(rows) == out
    first_seen = []
    for r in rows:
        for w in prefix_windows(r):
            if row_key(w) not in first_seen:
                first_seen.append(row_key(w))
    assert keys == first_seen


def test_distinct_rows_give_sum_of_history_lengths():
    rows = [_row("a", [1, 2, 3], 4), _row("b", [5, 6], 7)]
    assert len(expand_windows(rows)) == 3 + 2


def test_selection_slice_is_the_last_rows_and_never_trained_on():
    rows = [_row(f"u{i}", [i, i + 100], i + 200) for i in range(20)]
    train, select = windowed_rows(rows, 0.1)
    assert select == rows[-2:]
    selected = {row_key(r) for r in select}
    assert not selected & {row_key(r) for r in train}
    assert len(train) == 18 * 2
    assert split_for_selection(rows, 0.0) == (rows, [])
    assert selection_count(10, 0.01) == 1 and selection_count(1, 0.5) == 0 and selection_count(3, 0.9) == 2
    with pytest.raises(RecError, match="select_fraction"):
        selection_count(10, 1.0)


def test_training_rows_from_valid_never_read_test(synth_dataset_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_dataset_dir, data)
    (data / "train.csv").unlink()
    # a test split whose targets are unknown items: reading it anywhere would show up below
    cfg = DataConfig(dir=str(data), split="test", train_from="valid", select_fraction=0.1)
    train, select = training_rows(cfg)
    valid = read_split(str(data), "valid")
    test_targets = {(r.user_id, r.history_ids, r.item_id) for r in read_split(str(data), "test")}
    valid_pairs = {w_key for r in valid for w_key in map(row_key, prefix_windows(r))}
    assert {row_key(r) for r in train} <= valid_pairs
    assert select == valid[len(valid) - len(select):] and len(select) == -(-len(valid) // 10)
    assert not {(r.user_id, r.history_ids, r.item_id) for r in train} & (test_targets - {
        (r.user_id, r.history_ids, r.item_id) for r in valid})
    # without train_from: the train split and the valid split, as before
    train2, select2 = training_rows(DataConfig(dir=synth_dataset_dir, train_split="train", valid_split="valid"))
    assert train2 == read_split(synth_dataset_dir, "train") and select2 == read_split(synth_dataset_dir, "valid")
    assert training_rows(DataConfig(dir=synth_dataset_dir), selection_limit=3)[1] == select2[:3]


def test_config_refuses_the_evaluated_split():
    with pytest.raises(RecError, match="data.train_from"):
        load_config(None, ["data.train_from=test", "data.split=test"])
    with pytest.raises(RecError, match="data.train_from"):
        load_config(None, ["data.train_from=nope"])
    with pytest.raises(RecError, match="data.select_fraction"):
        load_config(None, ["data.train_from=valid", "data.select_fraction=1.5"])
    cfg = load_config(None, ["data.train_from=valid"])
    assert cfg.data.train_from == "valid" and cfg.data.select_fraction == 0.1


def test_longest_sequences_by_hand():
    rows = [_row("u", [1], 2), _row("u", [1, 2], 3), _row("v", [1, 2], 3), _row("w", [2], 3), _row("x", [5], 6)]
    # [1,2] and [1,2,3] (the first of the two equal rows) are inside... only [1,2] is a proper prefix;
    # [2,3] is a suffix, not a prefix, of [1,2,3], so it stays
    assert [(r.user_id, item_sequence(r)) for r in longest_sequences(rows)] == [("u", (1, 2, 3)), ("w", (2, 3)), ("x", (5, 6))]


@pytest.mark.parametrize("seed", range(5))
def test_longest_sequences_keep_every_prediction(seed):
    """Training on every position of the kept sequences makes exactly the (history -> next item)
    predictions of every prefix window of every row: nothing lost, no sequence kept twice."""
    rows = _random_rows(seed)
    kept = longest_sequences(rows)
    every = {row_key(w) for r in rows for w in prefix_windows(r)}
    from_kept = {row_key(w) for r in kept for w in prefix_windows(r)}
    assert from_kept == every
    seqs = [item_sequence(r) for r in kept]
    assert len(seqs) == len(set(seqs))
    for a in seqs:  # none is a proper prefix of another
        assert not any(len(b) > len(a) and b[: len(a)] == a for b in seqs)


@pytest.mark.parametrize("seed", range(3))
def test_consecutive_pairs_are_the_transition_table(seed):
    """The pairs `sid_pairs` trains are exactly those the transition baseline counts (over every
    prefix window's last item -> target), each once."""
    from rec.eval.baselines import transition_counts

    rows = expand_windows(_random_rows(seed))
    pairs = consecutive_pairs(rows)
    assert len(pairs) == len(set(pairs))
    table = transition_counts([r.history_sids[-1], r.item_sid] for r in rows if r.history_sids)
    assert set(pairs) == {(a, b) for a, nxt in table.items() for b in nxt}


def test_sid_pairs_rows(synth_dataset_dir):
    from rec.data.dataset import load_catalogue
    from rec.data.sft import sft_prompts

    rows = [_row("u", [1, 2], 3), _row("v", [2], 3)]
    prompts = sft_prompts(load_catalogue(synth_dataset_dir), rows, ["sid_pairs"], "x", 0)
    # the pair is one step of a sequence, not its end: no "\n", no EOS
    assert [(p.body, p.target, p.task, p.ends) for p in prompts] == [
        ("History: <a_1><b_0><c_0>", "<a_2><b_0><c_0>", "sid_pairs", False),
        ("History: <a_2><b_0><c_0>", "<a_3><b_0><c_0>", "sid_pairs", False),
    ]
