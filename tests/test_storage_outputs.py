"""When a stage's outputs count as finished (rec.storage.outputs), `rec outputs check|wait`, and
`rec rl` refusing an SFT run that has not finished."""

from __future__ import annotations

import json
import threading
import time

import pytest

from rec import storage
from rec.cli import _require_finished_sft, main
from rec.config import load_config
from rec.errors import InputNotStarted, RecError
from rec.storage import outputs
from tests.fixtures_deploy import fake_handoff


def test_a_run_is_done_only_with_its_completion_marker(tmp_path):
    run = str(tmp_path / "run")
    assert "no COMPLETED.json" in outputs.not_done("run", run)
    storage.write_text(f"{run}/checkpoints/sft_best/10/x", "a best-so-far")
    assert "no COMPLETED.json" in outputs.not_done("run", run)
    path = outputs.mark_completed(run, "sft", step=10)
    assert json.loads(open(path).read())["stage"] == "sft"
    assert outputs.not_done("run", run) == "" and outputs.completion(run)["step"] == 10


def test_eval_is_done_when_its_split_was_recorded(tmp_path):
    run = str(tmp_path / "eval")
    assert "no run_summary.json" in outputs.not_done("eval", run, "test")
    storage.write_text(f"{run}/run_summary.json", json.dumps({"train/steps": 3}))
    assert "no eval of split test" in outputs.not_done("eval", run, "test")
    storage.write_text(f"{run}/run_summary.json", json.dumps({"eval/split": "valid"}))
    assert "no eval of split test" in outputs.not_done("eval", run, "test")
    assert outputs.not_done("eval", run, "valid") == "" and outputs.not_done("eval", run) == ""


def test_handoff_is_done_when_it_verifies_on_gcs(gcs_bucket):
    prefix = f"gs://{gcs_bucket}/handoff/ds/r1/rl_last"
    assert "no MANIFEST.json" in outputs.not_done("handoff", prefix)
    fake_handoff(prefix)
    assert outputs.not_done("handoff", prefix) == ""
    storage.write_text(f"{prefix}/checkpoints/rl_last/1/extra", "added later")
    with pytest.raises(RecError, match="handoff does not verify"):
        outputs.not_done("handoff", prefix)


def test_unknown_kind_is_an_error(tmp_path):
    with pytest.raises(RecError, match="outputs kind 'nope'"):
        outputs.not_done("nope", str(tmp_path))


def test_wait_returns_once_the_marker_appears(tmp_path, capsys):
    run = str(tmp_path / "sft")
    storage.write_text(f"{run}/config.yaml", "run: {}\n")  # started
    timer = threading.Timer(0.3, outputs.mark_completed, args=(run, "sft"))
    timer.start()
    start = time.monotonic()
    outputs.wait_done("run", run, timeout=30, poll=0.02, start_timeout=0.05)
    timer.join()
    assert 0.25 <= time.monotonic() - start < 10  # started, so the short start timeout did not fire
    assert capsys.readouterr().err.startswith(f"waiting: {run}: no COMPLETED.json")


def test_wait_gives_the_slot_back_when_the_input_never_started(tmp_path):
    with pytest.raises(InputNotStarted, match="not started after"):
        outputs.wait_done("run", str(tmp_path / "sft"), timeout=30, poll=0.01, start_timeout=0.05)
    with pytest.raises(RecError, match="gave up after"):
        outputs.wait_done("run", str(tmp_path / "sft"), timeout=0.05, poll=0.01)


def test_outputs_cli_exit_codes(tmp_path, capsys):
    run = str(tmp_path / "sft")
    assert main(["outputs", "check", "run", run]) == 0
    assert capsys.readouterr().out == "pending\n"
    # the init container of a step applied beside its producer: 75 gives the slice back (restart)
    assert main(["outputs", "wait", "run", run, "--poll", "0.01", "--start-timeout", "0.05"]) == 75
    assert main(["outputs", "wait", "run", run, "--poll", "0.01", "--timeout", "0.05"]) == 2
    assert "gave up after" in capsys.readouterr().err
    outputs.mark_completed(run, "sft")
    assert main(["outputs", "check", "run", run]) == 0
    assert capsys.readouterr().out == "done\n"
    assert main(["outputs", "wait", "run", run, "--timeout", "1"]) == 0
    assert main(["outputs", "wait", "run", run, "--timeout", "soon"]) == 2


def test_rl_refuses_an_sft_run_that_has_not_finished(tmp_path, capsys):
    sft = tmp_path / "sft"
    storage.write_text(str(sft / "checkpoints/sft_best/4/x"), "best so far")
    code = main(["rl", "--config", "configs/tiny/rl.yaml", f"model.path={sft}", "model.checkpoint=sft_best",
                 f"run.dir={tmp_path / 'rl'}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: model.path={sft}: this SFT run has not finished (no COMPLETED.json)")
    assert "--allow-unfinished-sft" in err[0] and not (tmp_path / "rl").exists()
    cfg = load_config("configs/tiny/rl.yaml", [f"model.path={sft}", "model.checkpoint=sft_best"])
    _require_finished_sft(cfg, allow_unfinished=True)  # told otherwise: no refusal
    outputs.mark_completed(str(sft), "sft")
    _require_finished_sft(cfg, allow_unfinished=False)  # finished: accepted
