"""calc.py-equivalent metrics: hand-computed cases, properties, and the `rec metrics` command."""

import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rec.cli import main
from rec.errors import RecError
from rec.eval.metrics import NO_MATCH_RANK, compute_metrics, first_match_rank, metrics_main

VALID = {"<a_1><b_1><c_1>", "<a_1><b_1><c_2>", "<a_1><b_2><c_1>", "<a_2><b_1><c_1>", "<a_2><b_2><c_2>"}
A, B, C, D, E = sorted(VALID)
BAD = "<a_9><b_9><c_9>"  # not in the catalogue


def hand_case():
    return [
        # rank 0; the invalid BAD after the match is never reached, so it does not count
        {"input": "p1", "output": A + "\n", "predict": [A, BAD, B, C, D]},
        # rank 2; BAD before the match counts once
        {"input": "p2", "output": C + "\n", "predict": [B, BAD, C, D, E]},
        # no match (rank 1e6); BAD counts once
        {"input": "p3", "output": E + "\n", "predict": [A, B, C, D, BAD]},
        # quotes and newlines are stripped from both sides: rank 1
        {"input": "p4", "output": '"' + B + '"\n', "predict": ['"' + D + '"\n', " " + B + "\n", A, C, E]},
    ]


def test_hand_computed_values():
    m = compute_metrics(hand_case(), VALID)
    # n_beam = 5, so K in {1, 3, 5}; ranks are 0, 2, none, 1
    assert sorted(k for k in m if k.startswith("hr@")) == ["hr@1", "hr@3", "hr@5"]
    assert m["hr@1"] == pytest.approx(1 / 4)  # only sample 1
    assert m["hr@3"] == pytest.approx(3 / 4)  # samples 1, 2, 4
    assert m["hr@5"] == pytest.approx(3 / 4)
    assert m["ndcg@1"] == pytest.approx(1 / 4)
    # (1/log2(2) + 1/log2(4) + 1/log2(3)) / 4 = (1 + 0.5 + 0.6309297535714575) / 4
    assert m["ndcg@3"] == pytest.approx(0.5327324383928644, abs=1e-15)
    assert m["ndcg@5"] == pytest.approx(0.5327324383928644, abs=1e-15)
    assert m["invalid_prediction_count"] == 2
    assert m["num_samples"] == 4
    assert m["beams"] == 5


def test_topk_limited_by_first_sample_length():
    # the first sample has 3 predictions, so K in {1, 3}, even though the second has more
    preds = [
        {"output": A, "predict": [B, A, C]},  # rank 1
        {"output": A, "predict": [B, C, D, E, A]},  # rank 4: a miss at K <= 3
    ]
    m = compute_metrics(preds, VALID)
    assert sorted(k for k in m if "@" in k) == ["hr@1", "hr@3", "ndcg@1", "ndcg@3"]
    assert m["hr@1"] == 0.0
    assert m["hr@3"] == pytest.approx(0.5)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3)) / 2)


def test_fifty_beams_all_k():
    preds = [{"output": A + "\n", "predict": [BAD] * 19 + [A] + [B] * 30}]  # rank 19, 19 invalid before it
    m = compute_metrics(preds, VALID)
    assert [m[f"hr@{k}"] for k in (1, 3, 5, 10, 20, 50)] == [0, 0, 0, 0, 1, 1]
    assert m["ndcg@20"] == pytest.approx(1 / math.log2(21))
    assert m["ndcg@50"] == pytest.approx(1 / math.log2(21))
    assert m["invalid_prediction_count"] == 19


def test_match_on_target_outside_catalogue_counts_invalid_and_hits():
    # calc.py checks validity before comparing: the matching prediction itself is counted invalid
    preds = [{"output": BAD, "predict": [A, BAD]}]
    m = compute_metrics(preds, VALID)
    assert m["hr@1"] == 0.0
    assert first_match_rank([A, BAD], BAD, frozenset(VALID)) == (1, 1)
    assert first_match_rank([A, B], C, frozenset(VALID)) == (NO_MATCH_RANK, 0)


def test_list_valued_output_uses_first_element():
    preds = [{"output": ['"' + B + '"', A], "predict": [B, A]}]
    assert compute_metrics(preds, VALID)["hr@1"] == 1.0
    # calc.py strips quotes first, then spaces: a space after the closing quote keeps the quote
    preds = [{"output": ['"' + B + '" ', A], "predict": [B, A]}]
    assert compute_metrics(preds, VALID)["hr@1"] == 0.0


@pytest.mark.parametrize(
    "bad",
    [[], [{"output": A}], [{"predict": [A]}], [{"output": A, "predict": "A"}], [{"output": A, "predict": [1]}], ["x"]],
)
def test_malformed_records_raise(bad):
    with pytest.raises(RecError):
        compute_metrics(bad, VALID)


@st.composite
def prediction_sets(draw):
    sids = [f"<a_{i}><b_{j}><c_0>" for i in range(3) for j in range(3)]
    n_beam = draw(st.integers(1, 12))
    n = draw(st.integers(1, 20))
    records = []
    for _ in range(n):
        predict = draw(st.lists(st.sampled_from(sids), min_size=n_beam, max_size=n_beam))
        records.append({"output": draw(st.sampled_from(sids)) + "\n", "predict": predict})
    return records, set(sids)


@settings(max_examples=60, deadline=None)
@given(prediction_sets())
def test_properties(case):
    records, valid = case
    m = compute_metrics(records, valid, topk=(1, 2, 3, 5, 8, 10, 12))
    ks = sorted(int(k[3:]) for k in m if k.startswith("hr@"))
    for k_small, k_big in zip(ks, ks[1:], strict=False):
        assert m[f"hr@{k_small}"] <= m[f"hr@{k_big}"]
        assert m[f"ndcg@{k_small}"] <= m[f"ndcg@{k_big}"] + 1e-12
    for k in ks:
        assert 0.0 <= m[f"ndcg@{k}"] <= m[f"hr@{k}"] + 1e-12 <= 1.0 + 1e-12
    assert m["ndcg@1"] == pytest.approx(m["hr@1"])
    assert m["invalid_prediction_count"] == 0  # every prediction is a catalogue SID
    # brute force: HR@k from the position of the target in each list
    for k in ks:
        hits = sum(r["output"].strip() in r["predict"][:k] for r in records)
        assert m[f"hr@{k}"] == pytest.approx(hits / len(records))


def _write_case(tmp_path):
    pred_path = tmp_path / "eval_predictions.json"
    pred_path.write_text(json.dumps(hand_case()))
    data_dir = tmp_path / "ds"
    data_dir.mkdir()
    (data_dir / "info.txt").write_text("".join(f"{sid}\ttitle {i}\t{i}\n" for i, sid in enumerate(sorted(VALID))))
    return pred_path, data_dir


def test_metrics_main_json_and_table(tmp_path, capsys):
    pred_path, data_dir = _write_case(tmp_path)
    assert main(["metrics", "--predictions", str(pred_path), "--info", str(data_dir), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed == compute_metrics(hand_case(), VALID)
    # an info file path works as well as the dataset directory
    m = metrics_main(str(pred_path), str(data_dir / "info.txt"))
    table = capsys.readouterr().out
    assert "invalid predictions 2" in table and "0.5327" in table
    assert m["hr@3"] == pytest.approx(0.75)


def test_metrics_cli_errors(tmp_path, capsys):
    pred_path, data_dir = _write_case(tmp_path)
    assert main(["metrics", "--predictions", str(tmp_path / "none.json"), "--info", str(data_dir)]) == 2
    assert "none.json: predictions file not found" in capsys.readouterr().err
    broken = tmp_path / "broken.json"
    broken.write_text('[{"output": "x",\n')
    assert main(["metrics", "--predictions", str(broken), "--info", str(data_dir)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "broken.json" in err and "\n" not in err
    assert main(["metrics", "--predictions", str(pred_path), "--info", str(tmp_path / "nodir")]) == 2
    assert "info file not found" in capsys.readouterr().err
