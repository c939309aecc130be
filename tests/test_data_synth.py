"""`rec data synth`: valid format, deterministic, learnable (counting baselines), upstream-style splits."""

import json
from collections import Counter, defaultdict

import pytest

from rec.data.check import check_dataset
from rec.data.dataset import load_catalogue, read_split
from rec.errors import RecError
from tests.fixtures_data import make_synth_dataset


def _files(directory):
    import os

    return {n: open(os.path.join(directory, n), "rb").read() for n in sorted(os.listdir(directory))}


def test_deterministic_given_seed(tmp_path):
    a = make_synth_dataset(tmp_path / "a", seed=3)
    b = make_synth_dataset(tmp_path / "b", seed=3)
    c = make_synth_dataset(tmp_path / "c", seed=4)
    assert _files(a) == _files(b)
    assert _files(a)["train.csv"] != _files(c)["train.csv"]
    assert set(_files(a)) == {"train.csv", "valid.csv", "test.csv", "info.txt", "index.json", "item.json", "meta.json"}


def test_splits_follow_upstream_recipe(synth_dataset_dir):
    splits = {s: read_split(synth_dataset_dir, s) for s in ("train", "valid", "test")}
    n = sum(len(v) for v in splits.values())
    assert len(splits["train"]) == int(0.8 * n)
    assert len(splits["valid"]) == int(0.9 * n) - int(0.8 * n)
    rows = [r for v in splits.values() for r in v]
    assert all(1 <= len(r.history_ids) <= 10 for r in rows)
    assert max(len(r.history_ids) for r in rows) == 10  # the sliding window is used
    # a user's samples are prefixes of one sequence: while the window is not full, the history of
    # the sample with k+1 items is the history with k items plus that sample's target
    by_user = defaultdict(dict)
    for r in rows:
        if len(r.history_ids) < 10:
            by_user[r.user_id][len(r.history_ids)] = r
    chained = 0
    for samples in by_user.values():
        for k, r in samples.items():
            if k + 1 in samples:
                assert samples[k + 1].history_ids == r.history_ids + (r.item_id,)
                chained += 1
    assert chained > len(rows) // 2
    # users appear in several splits (global time split), as upstream
    users = [{r.user_id for r in v} for v in splits.values()]
    assert users[0] & users[2]


@pytest.mark.parametrize("levels", [3, 4])
def test_levels_and_check(tmp_path, levels):
    d = make_synth_dataset(tmp_path / "d", levels=levels, items=64, users=60)
    assert check_dataset(d) == []
    cat = load_catalogue(d)
    assert cat.sid_depth == levels and cat.sid_depths == {levels}
    assert len(cat.all_sids) == len(cat) == 64  # no collisions in synthetic data
    letters = {t[1] for toks in cat.sid_tokens for t in toks}
    assert letters == set("abcd"[:levels])


def test_sid_prefix_encodes_category(synth_dataset_dir):
    cat = load_catalogue(synth_dataset_dir)
    nouns_by_a = defaultdict(set)
    for toks, title in zip(cat.sid_tokens, cat.titles, strict=True):
        noun = title.split(",")[0].split(" ", 2)[-1]
        nouns_by_a[toks[0]].add(noun.replace("Duty ", ""))
    # one first-level code per category noun
    assert all(len(v) == 1 for v in nouns_by_a.values())
    assert len(nouns_by_a) >= 4


def _successor_baseline_hr10(directory):
    train = read_split(directory, "train")
    test = read_split(directory, "test")
    following = defaultdict(Counter)
    popularity = Counter()
    for r in train:
        seq = list(r.history_ids) + [r.item_id]
        for a, b in zip(seq, seq[1:], strict=False):
            following[a][b] += 1
        popularity[r.item_id] += 1
    hits = 0
    for r in test:
        ranked = [i for i, _ in following[r.history_ids[-1]].most_common(10)]
        ranked += [i for i, _ in popularity.most_common() if i not in ranked][: 10 - len(ranked)]
        hits += r.item_id in ranked
    return hits / len(test)


def test_learnable_by_counting(tmp_path):
    d = make_synth_dataset(tmp_path / "default", users=600, items=240, seed=0)  # the demo's default size
    chance = 10 / len(load_catalogue(d))
    hr10 = _successor_baseline_hr10(d)
    assert chance < 0.05
    assert hr10 > 0.5 > 10 * chance


def test_bad_arguments(tmp_path):
    with pytest.raises(RecError, match="levels must be 3 or 4"):
        make_synth_dataset(tmp_path / "x", levels=5)
    with pytest.raises(RecError, match="items must be at least"):
        make_synth_dataset(tmp_path / "x", items=2)



def test_synth_rewrites_its_own_output_but_no_other_directory(tmp_path, office_dir):
    """A second `data synth` into the same directory replaces the synthetic data; a real dataset
    (no meta.json saying "synthetic") is never overwritten."""
    import shutil

    out = tmp_path / "synth"
    make_synth_dataset(out, users=30, items=16, seed=1)
    make_synth_dataset(out, users=40, items=16, seed=2)
    assert json.loads((out / "meta.json").read_text())["synthetic"]["users"] == 40
    real = tmp_path / "office"
    shutil.copytree(office_dir, real)
    before = {p.name: p.stat().st_size for p in real.iterdir()}
    with pytest.raises(RecError, match=r"--out .*office: not empty and not an earlier synthetic dataset"):
        make_synth_dataset(real, users=30, items=16)
    assert {p.name: p.stat().st_size for p in real.iterdir()} == before


def test_cli_synth(tmp_path, capsys):
    from rec.cli import main

    out = str(tmp_path / "cli")
    assert main(["data", "synth", "--out", out, "--users", "30", "--items", "16", "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip() == out
    assert check_dataset(out) == []
