"""Popularity, item-to-item and SASRec baselines: hand-computed rankings and metrics, the rows
they learn from, and the CLI."""

import json

import pytest

from rec.cli import main
from rec.data.dataset import load_catalogue
from rec.errors import RecError
from rec.eval.baselines import (
    baseline_rows,
    popularity_counts,
    ranked_by_count,
    score_baselines,
    transition_counts,
    transition_predict,
)

A, B, C, D, E = "<a_1><b_1><c_1>", "<a_1><b_1><c_2>", "<a_1><b_2><c_1>", "<a_2><b_1><c_1>", "<a_2><b_2><c_1>"
FIT = [([A], B), ([A], B), ([A], C), ([B], C)]


def test_counts_and_rankings():
    sequences = [h + [t] for h, t in FIT]
    counts = popularity_counts(sequences)
    assert counts == {A: 3, B: 3, C: 2}
    assert ranked_by_count(counts) == [A, B, C]  # A and B tie at 3: SID order decides
    table = transition_counts(sequences)
    assert table == {A: {B: 2, C: 1}, B: {C: 1}}
    popular = [A, B, C, D, E]
    # from A: B 2/3, C 1/3, then popularity fills A, D, E
    assert transition_predict([A], table, popular, 5) == [B, C, A, D, E]
    # history [A, B]: B (weight 1) -> C 1.0; A (weight 0.5) -> B 1/3, C 1/6: C 7/6, B 1/3
    assert transition_predict([A, B], table, popular, 3) == [C, B, A]
    # an unseen last item contributes nothing; the older B still does
    assert transition_predict([B, D], table, popular, 2) == [C, A]


def test_score_baselines_hand_computed():
    eval_rows = [([A], B), ([D, B], C)]
    results = score_baselines(FIT, eval_rows, [A, B, C, D, E], k=5)
    # popularity counts each training row's target once: B 2, C 2 (SID order), then A, D, E
    pop = results["popularity"]
    assert pop["hr@1"] == 0.5 and pop["hr@3"] == 1.0
    assert pop["ndcg@3"] == pytest.approx((1.0 + 1 / 1.584962500721156) / 2)
    # transition (last history item -> target): [B, ...] for [A] and [C, ...] for [D, B]
    assert results["transition"]["hr@1"] == 1.0 and results["transition"]["ndcg@5"] == pytest.approx(1.0)
    assert pop["invalid_prediction_count"] == 0 and pop["beams"] == 5


def test_windowed_rows_count_each_transition_once():
    # the rows of one sequence A B C as prefix windows: A->B, AB->C; the pair A->B is counted once
    results = score_baselines([([A], B), ([A, B], C)], [([A], B), ([B], C)], [A, B, C, D, E], k=3)
    assert results["transition"]["hr@1"] == 1.0


def test_eval_targets_are_not_learned():
    # the evaluated rows' targets (and histories) must not change the fitted lists
    eval_rows = [([E], D), ([E], D), ([E], D)]
    results = score_baselines([([A], B)], eval_rows, [A, B, C, D, E], k=3)
    assert results["popularity"]["hr@3"] == 0.0  # D never seen in the fit rows: ranked after B, A, C
    assert results["transition"]["hr@3"] == 0.0


def test_baseline_rows_follow_train_from(synth_dataset_dir, tmp_path):
    import shutil

    from rec.data.dataset import read_split
    from rec.data.windows import windowed_rows

    train, select, evaluated = baseline_rows(synth_dataset_dir, "test")
    assert train == read_split(synth_dataset_dir, "train") and select == read_split(synth_dataset_dir, "valid")
    assert evaluated == read_split(synth_dataset_dir, "test")
    data = tmp_path / "data"
    shutil.copytree(synth_dataset_dir, data)
    (data / "train.csv").unlink()
    train, select, _ = baseline_rows(str(data), "test")  # no train.csv: valid rows + windows
    assert (train, select) == windowed_rows(read_split(str(data), "valid"), 0.1)
    with pytest.raises(RecError, match="no split before 'valid'"):
        baseline_rows(str(data), "valid")
    with pytest.raises(RecError, match="data.train_from"):
        baseline_rows(str(data), "test", train_from="test")


def test_rec_baselines_cli(synth_dataset_dir, tmp_path, capsys):
    out = tmp_path / "baselines.json"
    assert main(["baselines", "--data", synth_dataset_dir, "--split", "test", "--out", str(out), "--seeds", "2",
                 "--epochs", "8"]) == 0
    printed = capsys.readouterr().out
    written = json.loads(out.read_text())
    assert set(written) == {"popularity", "transition", "sasrec"}
    assert "method" in printed and "sasrec" in printed and "±" in printed
    n_sids = len(load_catalogue(synth_dataset_dir).all_sids)
    for figures in written.values():
        # 50 recommendations, or the whole catalogue when it is smaller
        assert figures["invalid_prediction_count"] == 0 and figures["beams"] == min(50, n_sids)
        assert 0.0 <= figures["ndcg@10"] <= figures["hr@10"] <= figures["hr@20"] <= 1.0
    sasrec = written["sasrec"]
    assert sasrec["seeds"] == [0, 1] and len(sasrec["per_seed"]) == 2 and set(sasrec["std"]) >= {"hr@10", "ndcg@10"}
    assert sasrec["hr@10"] == pytest.approx(sum(s["hr@10"] for s in sasrec["per_seed"]) / 2)
    # the synthetic data has strong item-to-item structure: both sequence models beat popularity
    assert written["transition"]["hr@10"] > written["popularity"]["hr@10"]
    assert written["sasrec"]["hr@10"] > written["popularity"]["hr@10"]
    assert main(["baselines", "--data", synth_dataset_dir, "--split", "nope"]) == 2
    assert "--split" in capsys.readouterr().err
    # an --out that cannot be written is refused before any fitting; one seed shows no "±"
    assert main(["baselines", "--data", synth_dataset_dir, "--out", str(tmp_path), "--seeds", "1"]) == 2
    assert capsys.readouterr().err.strip() == f"error: --out {tmp_path}: is a directory; name the JSON file to write"
    one = tmp_path / "one.json"
    assert main(["baselines", "--data", synth_dataset_dir, "--out", str(one), "--seeds", "1", "--epochs", "2"]) == 0
    assert "±" not in capsys.readouterr().out and "std" not in json.loads(one.read_text())["sasrec"]
