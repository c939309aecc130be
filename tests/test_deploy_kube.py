"""submit / wait / status / pipeline against a fake kube-apiserver on loopback (tests/fixtures_deploy.py)."""

from __future__ import annotations

import json
import pathlib
import socket

import pytest

from rec.errors import RecError
from tests.fixtures_deploy import fake_handoff, run_workflow, write_outputs
from tools import render
from tools.deploy import kube

RUNNING_JS = {"replicatedJobsStatus": [{"name": "slice", "active": 1, "ready": 1}]}
DONE_JS = {
    "terminalState": "Completed",
    "conditions": [{"type": "Completed", "status": "True", "message": "jobset completed"}],
}
FAILED_JS = {
    "terminalState": "Failed",
    "restarts": 3,
    "conditions": [
        {
            "type": "Failed",
            "status": "True",
            "reason": "ReachedMaxRestarts",
            "message": "jobset failed due to reaching max number of restarts",
        }
    ],
}
RUNNING_JOB = {"active": 1}
DONE_JOB = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}


def _argv(action, kubeconfig, tmp_path, *extra):
    return [
        action,
        "--dataset",
        "industrial",
        "--out",
        str(tmp_path / "rendered"),
        "--kubeconfig",
        kubeconfig,
        "--context",
        "fake",
        "--poll",
        "0.01",
        "--no-progress",
        *extra,
    ]


def _pod(name, phase, exit_code=None, reason="Error", message=""):
    status = {"phase": phase}
    if exit_code is not None:
        status["containerStatuses"] = [
            {
                "name": "rec",
                "state": {"terminated": {"exitCode": exit_code, "reason": reason, "message": message}},
            }
        ]
    return {"metadata": {"name": name}, "status": status}


def test_pipeline_runs_every_step_in_order(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    for name in ("sft-industrial-r1", "rl-industrial-r1", "eval-industrial-r1"):
        state.script(name, {}, RUNNING_JS, RUNNING_JS, DONE_JS)
    state.script("upload-industrial-r1", RUNNING_JOB, DONE_JOB)
    state.pods["sft-industrial-r1"] = [
        _pod(f"sft-industrial-r1-slice-0-{i}-abcde", "Running") for i in range(4)
    ]
    assert render.main(_argv("pipeline", kubeconfig, tmp_path)) == 0
    assert state.created == [
        "sft-industrial-r1",
        "rl-industrial-r1",
        "upload-industrial-r1",
        "eval-industrial-r1",
    ]
    posts = [path for method, path in state.requests if method == "POST"]
    # every create asks for server-side Strict field validation (unknown fields refused, not pruned)
    strict = "?fieldValidation=Strict"
    assert posts == [f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/rec/jobsets{strict}"] * 2 + [
        f"/apis/batch/v1/namespaces/rec/jobs{strict}",
        f"/apis/jobset.x-k8s.io/v1alpha2/namespaces/rec/jobsets{strict}",
    ]
    # what was submitted is exactly the rendered, validated manifest
    sent = state.objects[("jobsets", "rec", "rl-industrial-r1")]
    assert sent["spec"]["replicatedJobs"][0]["template"]["spec"]["parallelism"] == 4
    out = capsys.readouterr().out
    assert "[4/4] eval: JobSet rec/eval-industrial-r1 completed" in out and out.strip().endswith(
        "pipeline: done"
    )


def test_pipeline_stops_at_a_failed_middle_step(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    state.script("sft-industrial-r1", RUNNING_JS, DONE_JS)
    state.script("rl-industrial-r1", RUNNING_JS, FAILED_JS)
    state.pods["rl-industrial-r1"] = [
        _pod("rl-industrial-r1-slice-0-0-aaaaa", "Failed", 1, message="Traceback...\nValueError: nan loss\n"),
        _pod("rl-industrial-r1-slice-0-1-bbbbb", "Failed", 143, reason="Error"),
    ]
    assert render.main(_argv("pipeline", kubeconfig, tmp_path)) == 2
    assert state.created == ["sft-industrial-r1", "rl-industrial-r1"]  # upload and eval never started
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: step 'rl' failed: JobSet rec/rl-industrial-r1 Failed")
    assert "reaching max number of restarts" in last and "restarts used: 3" in last
    assert "pod rl-industrial-r1-slice-0-0-aaaaa container rec exited 1 (Error): ValueError: nan loss" in last
    assert "later steps were not started" in last
    assert "kubectl logs --context fake -n rec -l jobset.sigs.k8s.io/jobset-name=rl-industrial-r1" in last
    assert "gcloud logging read" in last and 'pod_name:"rl-industrial-r1-"' in last
    assert "container rec exited 143" in err  # every failed pod is listed above the error line


def test_wait_times_out_with_a_clear_message(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    state.script("sft-industrial-r1", RUNNING_JS)
    state.pods["sft-industrial-r1"] = [_pod("p0", "Running"), _pod("p1", "Pending")]
    assert render.main(_argv("train", kubeconfig, tmp_path, "--timeout", "0.3")) == 2
    err = capsys.readouterr().err
    assert "error: JobSet rec/sft-industrial-r1: still Running after" in err and "(timeout)" in err
    assert "keeps running" in err and state.created == ["sft-industrial-r1"]


def test_rerun_skips_completed_steps_and_attaches_to_running_ones(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    assert render.main(["render", "--out", str(tmp_path / "rendered")]) == 0
    from tools.deploy import manifests

    docs = manifests.read_rendered(tmp_path / "rendered/industrial/train.yaml")
    state.preload("jobsets", "rec", {**docs[0], "status": DONE_JS})
    write_outputs(docs[0])  # the finished SFT left its COMPLETED.json
    state.preload("jobsets", "rec", {**docs[1], "status": RUNNING_JS})
    state.script("rl-industrial-r1", RUNNING_JS, DONE_JS)
    assert render.main(_argv("train", kubeconfig, tmp_path)) == 0
    out = capsys.readouterr().out
    assert "sft: outputs at gs://example-rec-artifacts/runs/industrial/r1/sft are done; skipping" in out
    assert "rl: JobSet rec/rl-industrial-r1 is already Running; waiting for it" in out
    assert state.created == []


def test_an_earlier_failed_attempt_is_not_silently_reused(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    render.main(["render", "--out", str(tmp_path / "rendered")])
    from tools.deploy import manifests

    docs = manifests.read_rendered(tmp_path / "rendered/industrial/upload.yaml")
    state.preload(
        "jobs",
        "rec",
        {
            **docs[0],
            "status": {
                "failed": 3,
                "conditions": [
                    {
                        "type": "Failed",
                        "status": "True",
                        "reason": "BackoffLimitExceeded",
                        "message": "Job has reached the specified backoff limit",
                    }
                ],
            },
        },
    )
    assert render.main(_argv("upload", kubeconfig, tmp_path)) == 2
    err = capsys.readouterr().err
    assert (
        "step 'upload' failed: Job rec/upload-industrial-r1 Failed (Job has reached the specified backoff limit)"
        in err
    )
    assert "kubectl delete job -n rec upload-industrial-r1" in err and "new RUN name" in err


def test_submit_wait_and_status(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    assert render.main(_argv("submit", kubeconfig, tmp_path, "--step", "grpo")) == 0
    assert state.created == ["grpo-gsm8k-r1"]
    assert render.main(_argv("submit", kubeconfig, tmp_path, "--step", "grpo")) == 0
    assert "already exists" in capsys.readouterr().out
    state.script("grpo-gsm8k-r1", RUNNING_JS, {"restarts": 1, **RUNNING_JS}, DONE_JS)
    assert render.main(_argv("wait", kubeconfig, tmp_path, "--step", "grpo")) == 0
    assert "grpo-gsm8k-r1: Completed" in capsys.readouterr().out
    state.pods["grpo-gsm8k-r1"] = [_pod("g0", "Succeeded")]
    assert render.main(_argv("status", kubeconfig, tmp_path)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("sft ") and "not submitted" in line for line in lines)
    assert any("grpo-gsm8k-r1: Completed; pods: 1 Succeeded" in line for line in lines)


def test_dry_run_prints_the_plan_and_touches_nothing(tmp_path, capsys):
    argv = [
        "pipeline",
        "--dataset",
        "office",
        "--out",
        str(tmp_path),
        "--dry-run",
        "--kubeconfig",
        str(tmp_path / "none"),
    ]
    assert render.main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "[1/4] sft: unless gs://example-rec-artifacts/runs/office/r1/sft is done, would create JobSet rec/sft-office-r1 from k8s/rendered/office/train.yaml, then wait up to 48h00m for it to complete",
        "[2/4] rl: unless gs://example-rec-artifacts/runs/office/r1/rl is done, would create JobSet rec/rl-office-r1 from k8s/rendered/office/train.yaml, then wait up to 48h00m for it to complete",
        "[3/4] upload: unless gs://example-rec-artifacts/handoff/office/r1/rl_last is done, would create Job rec/upload-office-r1 from k8s/rendered/office/upload.yaml, then wait up to 2h00m for it to complete",
        "[4/4] eval: unless gs://example-rec-artifacts/runs/office/r1/eval is done, would create JobSet rec/eval-office-r1 from k8s/rendered/office/eval.yaml, then wait up to 12h00m for it to complete",
    ]


def test_missing_kube_context_is_one_line_pointing_to_make_render(tmp_path, capsys):
    argv = ["train", "--out", str(tmp_path), "--kubeconfig", str(tmp_path / "missing-kubeconfig")]
    assert render.main(argv) == 2
    # notes about run configs missing from the checkout may precede it; the error is one line
    lines = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: no usable Kubernetes context")
    err = lines[0]
    assert "gcloud container clusters get-credentials example-tpu-cluster --location us-east5" in err
    assert "make render" in err


def test_unreachable_api_server_is_a_clear_error(fake_kube, tmp_path, capsys):
    _, kubeconfig = fake_kube
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    path = pathlib.Path(kubeconfig)
    config = json.loads(path.read_text())
    config["clusters"][0]["cluster"]["server"] = f"http://127.0.0.1:{port}"
    path.write_text(json.dumps(config))
    assert render.main(_argv("status", kubeconfig, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "cannot reach the Kubernetes API" in err and err.count("\n") == 1


# ---------------------------------------------------------------------------------------------
# Pure pieces


@pytest.mark.parametrize(
    "kind,obj,phase",
    [
        ("JobSet", None, "NotFound"),
        ("JobSet", {"status": {}}, "Pending"),
        ("JobSet", {"status": RUNNING_JS}, "Running"),
        ("JobSet", {"status": DONE_JS}, "Completed"),
        ("JobSet", {"status": FAILED_JS}, "Failed"),
        # terminalState not yet set, conditions already say so
        (
            "JobSet",
            {"status": {"conditions": [{"type": "Failed", "status": "True", "message": "m"}]}},
            "Failed",
        ),
        ("JobSet", {"status": {"conditions": [{"type": "Failed", "status": "False"}]}}, "Pending"),
        ("Job", {"status": RUNNING_JOB}, "Running"),
        ("Job", {"status": DONE_JOB}, "Completed"),
        (
            "Job",
            {
                "status": {
                    "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]
                }
            },
            "Failed",
        ),
    ],
)
def test_state_of(kind, obj, phase):
    assert kube.state_of(kind, obj).phase == phase


def test_state_carries_restarts_and_reason():
    state = kube.state_of("JobSet", {"status": FAILED_JS})
    assert (state.restarts, state.message) == (3, "jobset failed due to reaching max number of restarts")


def test_pod_summary_and_failures():
    pods = [
        _pod("a", "Running"),
        _pod("b", "Running"),
        _pod("c", "Failed", 2, message="error: data/x.csv:3: bad"),
        {
            "metadata": {"name": "d"},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "message": "0/8 nodes: Insufficient google.com/tpu",
                    }
                ],
            },
        },
    ]
    assert kube.pod_summary(pods) == "1 Failed, 1 Pending, 2 Running"
    assert kube.pod_failures(pods) == [
        "pod c container rec exited 2 (Error): error: data/x.csv:3: bad",
        "pod d unschedulable: 0/8 nodes: Insufficient google.com/tpu",
    ]


@pytest.mark.parametrize(
    "text,seconds", [("90", 90), ("90s", 90), ("30m", 1800), ("48h", 172800), ("2d", 172800), ("0.5", 0.5)]
)
def test_parse_duration(text, seconds):
    assert kube.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-1", "0"])
def test_parse_duration_rejects(text):
    with pytest.raises(RecError, match="--timeout"):
        kube.parse_duration(text)


def test_wait_reports_failure_with_reason_and_logs(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    assert render.main(_argv("submit", kubeconfig, tmp_path, "--step", "eval")) == 0
    state.script(
        "eval-industrial-r1",
        RUNNING_JS,
        {
            "terminalState": "Failed",
            "conditions": [
                {
                    "type": "Failed",
                    "status": "True",
                    "reason": "FailedJobs",
                    "message": "jobset failed due to FailJobSet rule userError",
                }
            ],
        },
    )
    assert render.main(_argv("wait", kubeconfig, tmp_path, "--step", "eval")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "eval-industrial-r1 failed (jobset failed due to FailJobSet rule userError)" in err
    assert "kubectl logs --context fake -n rec -l jobset.sigs.k8s.io/jobset-name=eval-industrial-r1" in err


def test_progress_line_shows_why_pods_wait(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    state.script("upload-industrial-r1", {}, {}, DONE_JOB)
    state.pods["upload-industrial-r1"] = [
        {
            "metadata": {"name": "u0"},
            "status": {
                "phase": "Pending",
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "message": "0/3 nodes are available: Insufficient cpu",
                    }
                ],
            },
        }
    ]
    argv = [a for a in _argv("upload", kubeconfig, tmp_path) if a != "--no-progress"]
    assert render.main(argv) == 0
    err = capsys.readouterr().err
    assert (
        "upload: Job rec/upload-industrial-r1" in err
        and "pod u0 unschedulable: 0/3 nodes are available" in err
    )


def test_logs_of_the_latest_submitted_step(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    assert render.main(_argv("logs", kubeconfig, tmp_path)) == 2
    assert "nothing of industrial run r1 was submitted yet" in capsys.readouterr().err
    for step in ("sft", "rl"):
        assert render.main(_argv("submit", kubeconfig, tmp_path, "--step", step)) == 0
    state.pods["rl-industrial-r1"] = [_pod(f"rl-industrial-r1-slice-0-{i}-x", "Running") for i in (1, 0)]
    state.logs = {
        "rl-industrial-r1-slice-0-0-x": "step 1\nstep 2\nstep 3\n",
        "rl-industrial-r1-slice-0-1-x": "worker 1 ok\n",
    }
    capsys.readouterr()
    assert render.main(_argv("logs", kubeconfig, tmp_path, "--tail", "2")) == 0
    assert capsys.readouterr().out.splitlines() == [
        "[rl-industrial-r1-slice-0-0-x] step 2",
        "[rl-industrial-r1-slice-0-0-x] step 3",
        "[rl-industrial-r1-slice-0-1-x] worker 1 ok",
    ]
    assert render.main(_argv("logs", kubeconfig, tmp_path, "--step", "sft")) == 0
    assert "no pods (not started, or removed by the TTL" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# A step is done when its outputs are (issue: finished steps re-run after their objects expire)


def test_finished_steps_are_not_rerun_after_their_objects_expired(fake_kube, tmp_path, capsys):
    """The JobSets and the Job are gone (ttlSecondsAfterFinished), their outputs are not: `make
    pipeline` must not put SFT and RL back on the slice."""
    state, kubeconfig = fake_kube
    render.main(["render", "--out", str(tmp_path / "rendered")])
    from tools.deploy import manifests

    for name in ("train", "upload", "eval"):
        for doc in manifests.read_rendered(tmp_path / f"rendered/industrial/{name}.yaml"):
            write_outputs(doc)
    assert render.main(_argv("pipeline", kubeconfig, tmp_path)) == 0
    out = capsys.readouterr().out
    assert state.created == [] and out.count("are done; skipping") == 4


def test_a_step_is_skipped_only_when_its_own_outputs_are_done(fake_kube, tmp_path, capsys):
    """SFT finished and expired; RL's run directory has checkpoints but no COMPLETED.json (it was
    preempted for the last time): RL is submitted again, SFT is not."""
    state, kubeconfig = fake_kube
    render.main(["render", "--out", str(tmp_path / "rendered")])
    from rec import storage
    from tools.deploy import manifests

    sft, _ = manifests.read_rendered(tmp_path / "rendered/industrial/train.yaml")
    write_outputs(sft)
    storage.write_text("gs://example-rec-artifacts/runs/industrial/r1/rl/checkpoints/rl_last/3/x", "partial")
    state.script("rl-industrial-r1", RUNNING_JS, DONE_JS)
    assert render.main(_argv("train", kubeconfig, tmp_path)) == 0
    assert state.created == ["rl-industrial-r1"]


def test_a_completed_object_without_its_outputs_stops_the_pipeline(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    state.on_complete = None  # the step "succeeds" but writes nothing
    state.script("sft-industrial-r1", RUNNING_JS, DONE_JS)
    assert render.main(_argv("train", kubeconfig, tmp_path)) == 2
    err = capsys.readouterr().err
    assert "step 'sft' failed" in err and "completed, but gs://example-rec-artifacts/runs/industrial/r1/sft: no COMPLETED.json" in err
    assert state.created == ["sft-industrial-r1"]


def test_a_handoff_that_does_not_verify_is_an_error_not_a_rerun(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    prefix = "gs://example-rec-artifacts/handoff/industrial/r1/rl_last"
    fake_handoff(prefix)
    from rec import storage

    storage.write_text(f"{prefix}/checkpoints/rl_last/1/params", "changed after publishing")
    assert render.main(_argv("upload", kubeconfig, tmp_path)) == 2
    assert "handoff does not verify" in capsys.readouterr().err and state.created == []


def test_submit_skips_a_step_whose_outputs_are_done(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    from rec.storage.outputs import mark_completed

    mark_completed("gs://example-rec-artifacts/runs/grpo-gsm8k/r1", "grpo")
    assert render.main(_argv("submit", kubeconfig, tmp_path, "--step", "grpo")) == 0
    assert "outputs at gs://example-rec-artifacts/runs/grpo-gsm8k/r1 are done; nothing to submit" in capsys.readouterr().out
    assert state.created == []


# ---------------------------------------------------------------------------------------------
# The JobSet controller's version (issue: an older controller silently changes the failure policy)


def _old_jobset_crd() -> dict:
    """The JobSet CRD as a controller before v0.10.0 serves it: no onJobFailureMessagePatterns."""
    import copy

    from tests.fixtures_deploy import JOBSET_CRD_FILE, MINIMAL_JOBSET_CRD, _load_yaml

    crd = copy.deepcopy(_load_yaml(JOBSET_CRD_FILE) if JOBSET_CRD_FILE.is_file() else MINIMAL_JOBSET_CRD)
    schema = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    rule = schema["properties"]["spec"]["properties"]["failurePolicy"]["properties"]["rules"]["items"]
    del rule["properties"]["onJobFailureMessagePatterns"]
    return crd


def test_an_old_jobset_controller_is_refused_before_anything_is_created(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    state.crds["jobsets.jobset.x-k8s.io"] = _old_jobset_crd()
    for action in (["train"], ["submit", "--step", "sft"], ["preflight"]):
        assert render.main(_argv(action[0], kubeconfig, tmp_path, *action[1:])) == 2, action
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: the cluster's JobSet controller is older than v0.10.0"), err
        assert "onJobFailureMessagePatterns" in err and "jobset/releases/download" in err
    assert state.created == []


def test_no_jobset_controller_is_one_line(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    state.crds.clear()
    assert render.main(_argv("preflight", kubeconfig, tmp_path)) == 2
    assert "error: the JobSet controller is not installed" in capsys.readouterr().err


def test_preflight_passes_on_a_current_controller(fake_kube, tmp_path, capsys):
    _, kubeconfig = fake_kube
    assert render.main(_argv("preflight", kubeconfig, tmp_path)) == 0
    assert capsys.readouterr().out.startswith("ok: fake: JobSet controller >= v0.10.0")


def test_strict_field_validation_refuses_what_an_old_crd_would_prune(fake_kube, tmp_path, capsys):
    """Even past the version check (a user who may not read CRDs), the create is Strict: the
    server refuses the unknown field instead of dropping it with a warning."""
    state, kubeconfig = fake_kube
    render.main(["render", "--out", str(tmp_path / "rendered")])
    from tools.deploy import manifests

    client = kube.KubeClient(context="fake", kubeconfig=kubeconfig)
    state.crds["jobsets.jobset.x-k8s.io"] = _old_jobset_crd()
    sft, _ = manifests.read_rendered(tmp_path / "rendered/industrial/train.yaml")
    with pytest.raises(RecError, match="HTTP 422.*onJobFailureMessagePatterns"):
        client.create(sft)
    assert state.created == []


def test_jobset_crd_problem_on_the_real_crd():
    from tests.fixtures_deploy import JOBSET_CRD_FILE, _load_yaml

    if not JOBSET_CRD_FILE.is_file():
        pytest.skip("../shared/k8s/ not present")
    assert kube.jobset_crd_problem(_load_yaml(JOBSET_CRD_FILE)) == ""
    assert "older than v0.10.0" in kube.jobset_crd_problem(_old_jobset_crd())


# ---------------------------------------------------------------------------------------------
# Transient API errors (issue: one transient API error ends a 48-hour wait)


@pytest.mark.parametrize("failures", [[503], [429, 500, 502], [0], [0, 503, 0, 504]])
def test_wait_retries_transient_api_errors(fake_kube, tmp_path, capsys, failures):
    state, kubeconfig = fake_kube
    assert render.main(_argv("submit", kubeconfig, tmp_path, "--step", "grpo")) == 0
    state.script("grpo-gsm8k-r1", RUNNING_JS, RUNNING_JS, DONE_JS)
    state.failures = list(failures)
    assert render.main(_argv("wait", kubeconfig, tmp_path, "--step", "grpo")) == 0
    assert "grpo-gsm8k-r1: Completed" in capsys.readouterr().out and not state.failures


def test_wait_gives_up_on_api_errors_only_at_its_timeout(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    assert render.main(_argv("submit", kubeconfig, tmp_path, "--step", "grpo")) == 0
    state.failures = [503] * 100000
    assert render.main(_argv("wait", kubeconfig, tmp_path, "--step", "grpo", "--timeout", "0.5")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "gave up after" in err and "(timeout)" in err and "HTTP 503" in err


def test_a_real_api_error_still_stops_the_wait(fake_kube, tmp_path, capsys):
    state, kubeconfig = fake_kube
    assert render.main(_argv("submit", kubeconfig, tmp_path, "--step", "grpo")) == 0
    state.failures = [403]
    assert render.main(_argv("wait", kubeconfig, tmp_path, "--step", "grpo")) == 2
    assert "HTTP 403" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# The Argo Workflow (issue: steps fail when their object already exists), run by a model of Argo


def _workflow(tmp_path):
    from tools.deploy import manifests

    render.main(["render", "--out", str(tmp_path / "rendered")])
    return manifests.read_rendered(tmp_path / "rendered/industrial/workflow.yaml")[0]


def _script_all(state):
    for name in ("sft-industrial-r1", "rl-industrial-r1", "eval-industrial-r1"):
        state.script(name, RUNNING_JS, DONE_JS)
    state.script("upload-industrial-r1", RUNNING_JOB, DONE_JOB)


STEPS = ("sft", "rl", "upload", "eval")


def test_workflow_twice_runs_each_step_once(fake_kube, tmp_path):
    """Argo CD re-creates a deleted Workflow (or someone resubmits it): the second run finds every
    output done and creates nothing."""
    state, kubeconfig = fake_kube
    _script_all(state)
    client = kube.KubeClient(context="fake", kubeconfig=kubeconfig)
    wf = _workflow(tmp_path)
    first = run_workflow(wf, client)
    assert [first[s] for s in STEPS] == ["Succeeded"] * 4
    assert state.created == [f"{s}-industrial-r1" for s in STEPS]
    state.objects.clear()  # the JobSets and the Job expired with their TTL
    second = run_workflow(wf, client)
    assert [second[s] for s in STEPS] == ["Skipped"] * 4 and all(second[f"{s}-done"] == "Succeeded" for s in STEPS)
    assert state.created == [f"{s}-industrial-r1" for s in STEPS]


def test_cli_first_then_workflow_adopts_and_skips(fake_kube, tmp_path, capsys):
    """`make train` ran SFT to the end and left RL running; then the Workflow of the same RUN:
    SFT is skipped (done), RL's object is adopted (no AlreadyExists) and waited for, the rest run."""
    state, kubeconfig = fake_kube
    state.script("sft-industrial-r1", RUNNING_JS, DONE_JS)
    assert render.main(_argv("submit", kubeconfig, tmp_path, "--step", "sft")) == 0
    assert render.main(_argv("wait", kubeconfig, tmp_path, "--step", "sft")) == 0
    assert render.main(_argv("submit", kubeconfig, tmp_path, "--step", "rl")) == 0  # still running
    state.script("rl-industrial-r1", RUNNING_JS, RUNNING_JS, DONE_JS)
    state.script("eval-industrial-r1", RUNNING_JS, DONE_JS)
    state.script("upload-industrial-r1", RUNNING_JOB, DONE_JOB)
    phases = run_workflow(_workflow(tmp_path), kube.KubeClient(context="fake", kubeconfig=kubeconfig))
    assert [phases[s] for s in STEPS] == ["Skipped", "Succeeded", "Succeeded", "Succeeded"]
    assert state.created == [f"{s}-industrial-r1" for s in STEPS]  # each created exactly once


def test_a_create_action_would_fail_on_an_existing_object(fake_kube, tmp_path):
    """What the Workflow did before (`action: create`): the step fails on the CLI's object."""
    state, kubeconfig = fake_kube
    assert render.main(_argv("submit", kubeconfig, tmp_path, "--step", "sft")) == 0
    wf = _workflow(tmp_path)
    for template in wf["spec"]["templates"]:
        if "resource" in template:
            template["resource"]["action"] = "create"
    phases = run_workflow(wf, kube.KubeClient(context="fake", kubeconfig=kubeconfig))
    assert phases["sft"] == "Failed" and phases["rl-done"] == "Omitted"


def test_workflow_stops_at_a_failed_step(fake_kube, tmp_path):
    state, kubeconfig = fake_kube
    state.script("sft-industrial-r1", RUNNING_JS, DONE_JS)
    state.script("rl-industrial-r1", RUNNING_JS, FAILED_JS)
    phases = run_workflow(_workflow(tmp_path), kube.KubeClient(context="fake", kubeconfig=kubeconfig))
    assert phases["sft"] == "Succeeded" and phases["rl"] == "Failed"
    assert phases["upload-done"] == phases["upload"] == "Omitted"
    assert state.created == ["sft-industrial-r1", "rl-industrial-r1"]
