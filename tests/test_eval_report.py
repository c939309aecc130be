"""report.html: self-contained, plots embedded, tables from run_summary.json, robust to missing parts."""

import base64
import json
import re

import pytest

from rec.errors import RecError
from rec.eval.report import read_metrics_jsonl, series_by_key, write_report


def _make_run(path, stage, hr10, with_reward=False):
    path.mkdir(parents=True)
    lines = []
    for step in range(1, 6):
        record = {"step": step, "stage": stage, "loss": 2.0 / step, "lr": 1e-3}
        if with_reward:
            record["reward_mean"] = 0.1 * step
        lines.append(json.dumps(record))
        if step % 2 == 0:
            lines.append(json.dumps({"step": step, "stage": stage, "valid_loss": 2.5 / step}))
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    summary = {"eval/hr@1": hr10 / 3, "eval/hr@10": hr10, "eval/ndcg@1": hr10 / 3, "eval/ndcg@10": hr10 / 2}
    summary.update({"eval/invalid_prediction_count": 0, "eval/num_samples": 4, "eval/beams": 10, "train/steps": 5})
    (path / "run_summary.json").write_text(json.dumps(summary))
    (path / "config.yaml").write_text("model:\n  path: <script>alert(1)</script>\n")
    preds = [{"input": "p", "output": "<a_1><b_1><c_1>\n", "predict": ["<a_1><b_2><c_1>", "<a_1><b_1><c_1>"]}]
    (path / "eval_predictions.json").write_text(json.dumps(preds))
    return path


def _images(page):
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


def test_report_two_runs(tmp_path):
    sft = _make_run(tmp_path / "sft", "sft", 0.4)
    rl = _make_run(tmp_path / "rl", "rl", 0.5, with_reward=True)
    (rl / "baselines.json").write_text(json.dumps({"popularity": {"hr@1": 0.05, "hr@10": 0.1, "ndcg@1": 0.05, "ndcg@10": 0.07}}))
    out = tmp_path / "report.html"
    assert write_report([str(sft), str(rl)], str(out)) == str(out)
    page = out.read_text()
    images = _images(page)
    assert len(images) == 4  # eval bars; SFT loss; RL loss; RL reward
    for image in images:
        assert base64.b64decode(image)[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<th>sft</th><th>rl</th>" in page
    assert "0.5000" in page and "0.4000" in page  # eval/hr@10 of both runs in the table
    assert "popularity" in page
    assert "<script>" not in page and "&lt;script&gt;" in page  # config text is escaped
    assert "src=\"http" not in page  # nothing fetched from outside


def test_report_partial_run(tmp_path):
    run = tmp_path / "only_metrics"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "stage": "sft", "loss": 1.0}) + "\n")
    out = tmp_path / "r.html"
    write_report(str(run), str(out))
    page = out.read_text()
    assert len(_images(page)) == 1 and "No evaluation figures yet" in page


def test_report_missing_dir(tmp_path):
    with pytest.raises(RecError, match="run directory not found"):
        write_report([str(tmp_path / "nope")], str(tmp_path / "r.html"))
    assert not (tmp_path / "r.html").exists()


def test_metrics_jsonl_parsing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "stage": "sft", "loss": 3.0}\n{"step": 2, "stage": "sft", "loss": 2.0}\n{"step": 3, "lo')
    records = read_metrics_jsonl(str(path))  # the torn last line of a killed run is ignored
    assert [r["step"] for r in records] == [1, 2]
    assert series_by_key(records) == {"sft/loss": ([1.0, 2.0], [3.0, 2.0])}
    path.write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(RecError, match=r"metrics.jsonl:2: not a JSON object"):
        read_metrics_jsonl(str(path))
