"""Popularity and item-to-item baselines: hand-computed rankings and metrics, and the CLI."""

import json

import pytest

from rec.cli import main
from rec.data.dataset import load_catalogue
from rec.eval.baselines import (
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
    # popularity list [A, B, C, D, E]: target B at rank 1, target C at rank 2
    pop = results["popularity"]
    assert pop["hr@1"] == 0.0 and pop["hr@3"] == 1.0
    assert pop["ndcg@3"] == pytest.approx((1 / 1.584962500721156 + 1 / 2) / 2)
    # transition: [B, ...] for [A] and [C, ...] for [D, B]: both at rank 0
    assert results["transition"]["hr@1"] == 1.0 and results["transition"]["ndcg@5"] == pytest.approx(1.0)
    assert pop["invalid_prediction_count"] == 0 and pop["beams"] == 5


def test_eval_targets_are_not_learned():
    # the evaluated rows' targets (and histories) must not change the fitted lists
    eval_rows = [([E], D), ([E], D), ([E], D)]
    results = score_baselines([([A], B)], eval_rows, [A, B, C, D, E], k=3)
    assert results["popularity"]["hr@3"] == 0.0  # D never seen in the fit rows: ranked after A, B, C
    assert results["transition"]["hr@3"] == 0.0


def test_rec_baselines_cli(synth_dataset_dir, tmp_path, capsys):
    out = tmp_path / "baselines.json"
    assert main(["baselines", "--data", synth_dataset_dir, "--split", "test", "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(out.read_text())
    assert set(printed) == {"popularity", "transition"}
    n_sids = len(load_catalogue(synth_dataset_dir).all_sids)
    for figures in printed.values():
        # 50 recommendations, or the whole catalogue when it is smaller
        assert figures["invalid_prediction_count"] == 0 and figures["beams"] == min(50, n_sids)
        assert 0.0 <= figures["ndcg@10"] <= figures["hr@10"] <= figures["hr@20"] <= 1.0
    # the synthetic data has strong item-to-item structure: transitions beat popularity
    assert printed["transition"]["hr@10"] > printed["popularity"]["hr@10"]
    assert main(["baselines", "--data", synth_dataset_dir, "--split", "nope"]) == 2
    assert "--split" in capsys.readouterr().err
