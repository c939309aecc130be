"""`rec eval`: exact output formats, metrics consistent with calc.py, bad inputs, real Office data."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from rec.config import load_config
from rec.data.dataset import load_catalogue, read_split
from rec.errors import RecError
from rec.eval.evaluate import check_rows, choose_buckets, left_pad, merge_summary, plan_batches, run_eval
from rec.eval.metrics import compute_metrics

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_EVAL = str(ROOT / "configs" / "tiny" / "eval.yaml")


# ---------------------------------------------------------------------------------------------
# Pure helpers


def test_choose_buckets_cover_every_prompt():
    lengths = [10, 12, 40, 41, 41, 90, 17, 33, 20, 100]
    buckets = choose_buckets(lengths, multiple=16)
    # median 33 -> 48; 90th percentile 90 -> 96; max 100 -> 112
    assert buckets == [48, 96, 112]
    assert choose_buckets([5], multiple=8) == [8]
    assert choose_buckets(lengths, multiple=16, min_rows_per_bucket=4) == [112]  # too few rows: one bucket
    assert max(choose_buckets(lengths)) >= max(lengths)


def test_plan_batches_keeps_order_and_size():
    lengths = [30, 100, 20, 35, 99, 10, 50]
    plan = plan_batches(lengths, [32, 64, 112], batch_size=2)
    assert plan == [(32, [0, 2]), (32, [5]), (64, [3, 6]), (112, [1, 4])]
    assert sorted(i for _, rows in plan for i in rows) == list(range(len(lengths)))
    with pytest.raises(ValueError):
        plan_batches([200], [32], 2)


def test_left_pad_fills_missing_rows():
    tokens, mask = left_pad([[5, 6, 7], [8]], length=4, pad_id=0, batch_size=3)
    np.testing.assert_array_equal(tokens, [[0, 5, 6, 7], [0, 0, 0, 8], [0, 5, 6, 7]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1], [0, 1, 1, 1]])
    assert tokens.dtype == np.int32 and mask.dtype == np.int32


def test_merge_summary_replaces_all_eval_keys():
    old = {"train/loss": 0.5, "eval/hr@50": 0.9, "eval/beams": 50}
    new = {"eval/hr@10": 0.2, "eval/beams": 10}
    assert merge_summary(old, new) == {"train/loss": 0.5, "eval/hr@10": 0.2, "eval/beams": 10}


def test_check_rows_names_line(synth_dataset_dir):
    rows = read_split(synth_dataset_dir, "test", limit=3)
    known = set(load_catalogue(synth_dataset_dir).all_sids)
    check_rows("t.csv", rows, known)  # all known: no error
    bad = rows[1].__class__(**{**rows[1].__dict__, "item_sid": "<a_999><b_0><c_0>"})
    with pytest.raises(RecError, match=r"t\.csv:7: unknown SID <a_999><b_0><c_0> in column 'item_sid'"):
        check_rows("t.csv", [rows[0], bad], known, line_numbers=[2, 7])


# ---------------------------------------------------------------------------------------------
# End to end


def _check_outputs(run_dir, data_dir, split, beams, limit=-1):
    """The files exist in the exact formats; summary metrics == calc.py metrics of the predictions."""
    from rec import storage

    records = json.loads(storage.read_text(storage.join(str(run_dir), "eval_predictions.json")))
    summary = json.loads(storage.read_text(storage.join(str(run_dir), "run_summary.json")))
    rows = read_split(str(data_dir), split, limit=limit)
    catalogue = set(load_catalogue(str(data_dir)).all_sids)
    assert len(records) == len(rows)
    for record, row in zip(records, rows, strict=True):
        assert set(record) == {"input", "output", "predict"}
        assert record["output"] == row.item_sid + "\n"  # test-row order
        assert record["input"].endswith(", ".join(row.history_sids) + "\n\n### Response:\n")
        assert len(record["predict"]) == beams and len(set(record["predict"])) == beams
        assert all(p in catalogue for p in record["predict"])
    expected = compute_metrics(records, catalogue)
    ks = [k for k in (1, 3, 5, 10, 20, 50) if k <= beams]
    assert sorted(k for k in summary if k.startswith("eval/hr@")) == sorted(f"eval/hr@{k}" for k in ks)
    for k in ks:
        assert summary[f"eval/hr@{k}"] == expected[f"hr@{k}"]
        assert summary[f"eval/ndcg@{k}"] == expected[f"ndcg@{k}"]
    assert summary["eval/invalid_prediction_count"] == 0
    assert summary["eval/num_samples"] == len(rows)
    assert summary["eval/beams"] == beams
    assert summary["eval/samples_per_s"] > 0
    assert summary["eval/split"] == split
    return records, summary


def test_run_eval_synthetic_random_model_on_gcs(synth_dataset_dir, synth_tokenizer_dir, gcs_bucket, monkeypatch):
    """Dataset and run directory on gs:// (a real GCS API server on loopback). A key another
    process adds to run_summary.json while eval decodes is kept."""
    from rec import storage
    from rec.eval import evaluate
    from rec.eval.metrics import metrics_main

    data_dir, run_dir = f"gs://{gcs_bucket}/data", f"gs://{gcs_bucket}/runs/eval"
    for item in pathlib.Path(synth_dataset_dir).iterdir():
        storage.write_bytes(f"{data_dir}/{item.name}", item.read_bytes())
    storage.write_text(f"{run_dir}/run_summary.json", json.dumps({"train/loss": 1.25, "eval/hr@50": 0.99}))
    cfg = load_config(
        TINY_EVAL,
        [f"data.dir={data_dir}", f"model.tokenizer={synth_tokenizer_dir}", f"run.dir={run_dir}",
         "eval.beams=5", "eval.batch_size=4", "run.progress=false"],
    )
    real_decode = evaluate.decode_rows

    def decode_while_training_writes(*args, **kwargs):
        summary = json.loads(storage.read_text(f"{run_dir}/run_summary.json"))
        storage.write_text(f"{run_dir}/run_summary.json", json.dumps({**summary, "train/steps": 7}))
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(evaluate, "decode_rows", decode_while_training_writes)
    figures = run_eval(cfg)
    _, summary = _check_outputs(run_dir, data_dir, "test", beams=5)
    assert summary["train/loss"] == 1.25 and "eval/hr@50" not in summary  # merged, stale eval keys dropped
    assert summary["train/steps"] == 7
    assert summary["eval/model"] == "random:tiny"
    assert figures == {k: v for k, v in summary.items() if k.startswith("eval/")}
    # `rec metrics` on the same gs:// files agrees with what eval reported
    recomputed = metrics_main(f"{run_dir}/eval_predictions.json", data_dir, as_json=True)
    assert all(summary[f"eval/{k}"] == v for k, v in recomputed.items())


def test_run_eval_on_the_selection_slice(synth_dataset_dir, synth_tokenizer_dir, tmp_path):
    """data.split=selection: the held-out tail of data.train_from that SFT/RL select on."""
    from rec.data.windows import training_rows

    out = tmp_path / "sel"
    base = [f"data.dir={synth_dataset_dir}", f"model.tokenizer={synth_tokenizer_dir}", f"run.dir={out}",
            "eval.beams=5", "eval.batch_size=4", "run.progress=false", "data.split=selection"]
    with pytest.raises(RecError, match="data.train_from"):
        run_eval(load_config(TINY_EVAL, base))
    cfg = load_config(TINY_EVAL, [*base, "data.train_from=valid", "data.select_fraction=0.25"])
    selection = training_rows(cfg.data)[1]
    figures = run_eval(cfg)
    records = json.loads((out / "eval_predictions.json").read_text())
    assert figures["eval/num_samples"] == len(records) == len(selection) > 0
    assert [r["output"] for r in records] == [r.item_sid + "\n" for r in selection]


def _run_cli(*args, timeout=300):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(
        [sys.executable, "-m", "rec", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def test_rec_eval_cli_on_hf_dir(synth_dataset_dir, synth_tokenizer_dir, tiny_hf_dir_factory, tmp_path):
    """The documented contract: an HF directory whose tokenizer already holds the SID tokens."""
    from rec.tokenizer import load_tokenizer

    vocab = len(load_tokenizer(synth_tokenizer_dir))
    hf_dir = tiny_hf_dir_factory(vocab_size=vocab, tied=True, tokenizer_dir=synth_tokenizer_dir)
    out = tmp_path / "out"
    result = _run_cli(
        "eval", "--config", TINY_EVAL, f"model.path={hf_dir}", f"data.dir={synth_dataset_dir}",
        "data.split=test", "eval.beams=10", f"run.dir={out}",
    )
    assert result.returncode == 0, result.stderr[-2000:]
    _check_outputs(out, synth_dataset_dir, "test", beams=10)
    assert "HR@10" in result.stderr


@pytest.fixture
def broken_copy(synth_dataset_dir, tmp_path):
    copy = tmp_path / "dataset"
    shutil.copytree(synth_dataset_dir, copy)
    return copy


def _assert_clean_failure(result, out, *fragments):
    assert result.returncode == 2, result.stderr[-2000:]
    err = result.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in err[0]
    assert not (out / "eval_predictions.json").exists()
    assert not (out / "run_summary.json").exists()


def test_cli_bad_inputs(broken_copy, synth_tokenizer_dir, tmp_path):
    out = tmp_path / "out"
    base = ["eval", "--config", TINY_EVAL, f"model.tokenizer={synth_tokenizer_dir}", f"run.dir={out}"]

    # an unknown SID in the test CSV: named by file and line
    lines = (broken_copy / "test.csv").read_text().splitlines(keepends=True)
    last_sid = lines[3].rstrip("\n").rsplit(",", 1)[1]
    lines[3] = lines[3].replace("," + last_sid, ",<a_999><b_0><c_0>")
    (broken_copy / "test.csv").write_text("".join(lines))
    result = _run_cli(*base, f"data.dir={broken_copy}")
    _assert_clean_failure(result, out, "test.csv:4:", "unknown SID <a_999><b_0><c_0>")

    # a missing split file
    (broken_copy / "test.csv").unlink()
    result = _run_cli(*base, f"data.dir={broken_copy}")
    _assert_clean_failure(result, out, "test.csv: not found")

    # a bad config key
    result = _run_cli(*base, f"data.dir={broken_copy}", "eval.beam=3")
    _assert_clean_failure(result, out, "eval.beam", "did you mean 'eval.beams'")


def _office_run(office_dir, tmp_path, limit):
    from rec.tokenizer import build_tokenizer

    tokenizer_dir = build_tokenizer(str(office_dir), str(tmp_path / "tok"), vocab_size=512)
    out = tmp_path / "out"
    cfg = load_config(
        TINY_EVAL,
        [f"data.dir={office_dir}", f"model.tokenizer={tokenizer_dir}", f"run.dir={out}", "data.split=test",
         "eval.beams=10", "eval.batch_size=16", f"eval.limit={limit}", "run.progress=false"],
    )
    run_eval(cfg)
    return _check_outputs(out, office_dir, "test", beams=10, limit=limit)


def test_eval_real_office_subset(office_dir, tmp_path):
    records, _ = _office_run(office_dir, tmp_path, limit=200)
    assert len(records) == 200


@pytest.mark.slow
def test_eval_real_office_all_rows(office_dir, tmp_path):
    records, summary = _office_run(office_dir, tmp_path, limit=-1)
    assert len(records) == summary["eval/num_samples"] == 4866
