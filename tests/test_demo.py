"""`rec demo`: the whole pipeline on generated data ends with a report (quick settings)."""

import json

import pytest

from rec.demo import MARKER, _prepare_out
from rec.errors import RecError


def test_out_dir_guard(tmp_path):
    user_dir = tmp_path / "mine"
    user_dir.mkdir()
    (user_dir / "notes.txt").write_text("keep me")
    with pytest.raises(RecError, match="not empty and not an earlier demo output"):
        _prepare_out(str(user_dir))
    assert (user_dir / "notes.txt").read_text() == "keep me"
    demo_dir = tmp_path / "demo"
    _prepare_out(str(demo_dir))
    (demo_dir / "sft").mkdir()
    (demo_dir / "sft" / "old.json").write_text("{}")
    _prepare_out(str(demo_dir))  # a previous demo: its stage outputs are cleared
    assert (demo_dir / MARKER).exists() and not (demo_dir / "sft").exists()


@pytest.mark.slow
def test_demo_quick(tmp_path, capsys):
    from rec.demo import run_demo

    out = tmp_path / "demo"
    report = run_demo(str(out), rl=True, quick=True)
    assert capsys.readouterr().out.strip().splitlines()[-1] == report == str(out / "report.html")
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3
    for run in ("sft", "rl"):
        summary = json.loads((out / run / "run_summary.json").read_text())
        assert summary["eval/invalid_prediction_count"] == 0
        assert summary["eval/num_samples"] == len(json.loads((out / run / "eval_predictions.json").read_text()))
    baselines = json.loads((out / "baselines.json").read_text())
    assert set(baselines) == {"popularity", "transition", "sasrec"}
