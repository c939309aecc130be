"""tools/render.py: rendering, determinism, hostile values and every validation rule."""

from __future__ import annotations

import copy
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import yaml

from rec.errors import RecError
from tools import render
from tools.deploy import checks, manifests, values

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """Everything rendered once for the dev env: {relative path: [docs]}."""
    out = tmp_path_factory.mktemp("rendered")
    render.render_all("dev", "all", None, out, environ={})
    return out, {str(p.relative_to(out)): manifests.read_rendered(p) for p in sorted(out.rglob("*.yaml"))}


def _doc(rendered, path: str, component: str) -> dict:
    docs = rendered[1][path]
    return copy.deepcopy(
        next(d for d in docs if d["metadata"]["labels"]["app.kubernetes.io/component"] == component)
    )


def _pod(doc: dict) -> dict:
    if doc["kind"] == "Job":
        return doc["spec"]["template"]
    return doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]


def _container(doc: dict) -> dict:
    return _pod(doc)["spec"]["containers"][0]


def _env_list(doc: dict) -> list:
    return _container(doc)["env"]


# ---------------------------------------------------------------------------------------------
# What gets rendered


def test_render_writes_the_expected_files(rendered):
    assert sorted(rendered[1]) == [
        "argocd/application.yaml",
        "cluster/setup.yaml",
        "grpo-gsm8k/train.yaml",
        "industrial/eval.yaml",
        "industrial/train.yaml",
        "industrial/upload.yaml",
        "industrial/workflow.yaml",
        "office/eval.yaml",
        "office/train.yaml",
        "office/upload.yaml",
        "office/workflow.yaml",
    ]


def test_train_jobset_v6e16_shape(rendered):
    for component in ("sft", "rl"):
        js = _doc(rendered, "industrial/train.yaml", component)
        assert js["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
        job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
        assert job["parallelism"] == job["completions"] == 4
        pod = job["template"]["spec"]
        assert pod["nodeSelector"] == {
            "cloud.google.com/gke-tpu-accelerator": "tpu-v6e-slice",
            "cloud.google.com/gke-tpu-topology": "4x4",
        }
        # one slice talks over ICI: pod network, so Workload Identity reaches the rec container
        assert "hostNetwork" not in pod and "dnsPolicy" not in pod
        assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == 4
        assert (
            js["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"]
            == "cloud.google.com/gke-nodepool"
        )
        assert 1 <= js["spec"]["failurePolicy"]["maxRestarts"] <= 10
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["JAX_PLATFORMS"]["value"] == "tpu"
        assert env["WANDB_API_KEY"]["valueFrom"]["secretKeyRef"]["optional"] is True
        args = pod["containers"][0]["args"]
        assert args[:4] == ["rec", component, "--config", f"configs/{component}/industrial-v6e16.yaml"]
        assert any(a.startswith("run.dir=gs://") for a in args)
    rl_args = _container(_doc(rendered, "industrial/train.yaml", "rl"))["args"]
    assert "model.checkpoint=sft_best" in rl_args
    sft_dir = next(
        a
        for a in _container(_doc(rendered, "industrial/train.yaml", "sft"))["args"]
        if a.startswith("run.dir=")
    )
    assert f"model.path={sft_dir.split('=', 1)[1]}" in rl_args


def test_eval_jobset_v6e8_single_host_reads_verified_handoff(rendered):
    js = _doc(rendered, "office/eval.yaml", "eval")
    job = js["spec"]["replicatedJobs"][0]["template"]["spec"]
    assert job["parallelism"] == job["completions"] == 1
    pod = job["template"]["spec"]
    assert pod["nodeSelector"]["cloud.google.com/gke-tpu-topology"] == "2x4"
    assert pod["nodeSelector"]["node.kubernetes.io/instance-type"] == "ct6e-standard-8t"
    assert pod["containers"][0]["resources"]["limits"]["google.com/tpu"] == 8
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    upload_args = _container(_doc(rendered, "office/upload.yaml", "upload"))["args"]
    assert env["REC_HANDOFF"] == upload_args[upload_args.index("--to") + 1]
    assert env["REC_CONFIG"] == "configs/eval/office-v6e8.yaml"
    script = pod["containers"][0]["args"][2]
    assert script.index('rec handoff verify "$REC_HANDOFF"') < script.index("rec eval")


def test_eval_command_verifies_then_evaluates(rendered, tmp_path):
    """Run the eval container's command with a stand-in `rec` that records its arguments."""
    container = _container(_doc(rendered, "industrial/eval.yaml", "eval"))
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    (bin_dir / "rec").write_text(
        '#!/bin/sh\necho "$*" >> "$CALLS"\n[ "$1" = handoff ] && [ -n "$FAIL_VERIFY" ] && exit 2\nexit 0\n'
    )
    (bin_dir / "rec").chmod(0o755)
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env.update(PATH=f"{bin_dir}:{os.environ['PATH']}", CALLS=str(log))
    assert subprocess.run(container["args"], env=env).returncode == 0
    verify, evaluate = log.read_text().splitlines()
    handoff = env["REC_HANDOFF"]
    assert verify == f"handoff verify {handoff}"
    assert evaluate.split() == [
        "eval",
        "--config",
        "configs/eval/industrial-v6e8.yaml",
        "run.dir=gs://example-rec-artifacts/runs/industrial/r1/eval",
        f"model.path={handoff}",
        "model.checkpoint=rl_last",
        "data.dir=/data/minionerec/Industrial_and_Scientific",
        "data.split=test",
    ]
    log.unlink()
    env["FAIL_VERIFY"] = "1"
    assert subprocess.run(container["args"], env=env).returncode == 2  # exit 2: FailJobSet, no retries
    assert log.read_text().splitlines() == [f"handoff verify {handoff}"]


def test_rendered_yaml_passes_yamllint():
    yamllint = pathlib.Path(sys.executable).parent / "yamllint"
    if not yamllint.exists():
        pytest.skip("yamllint not installed")
    config = (
        "{extends: default, rules: {line-length: {max: 160}, indentation: {indent-sequences: consistent}, "
        "document-start: disable, comments: {min-spaces-from-content: 1}}}"
    )
    targets = [str(ROOT / "k8s" / d) for d in ("values", "argocd", "rendered") if (ROOT / "k8s" / d).is_dir()]
    result = subprocess.run(
        [str(yamllint), "-f", "parsable", "-d", config, *targets], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout


def test_upload_job_is_cpu_and_publishes_the_rl_run(rendered):
    job = _doc(rendered, "industrial/upload.yaml", "upload")
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job"
    env = {e["name"]: e.get("value") for e in _env_list(job)}
    assert env["JAX_PLATFORMS"] == "cpu"
    args = _container(job)["args"]
    rl_dir = next(
        a
        for a in _container(_doc(rendered, "industrial/train.yaml", "rl"))["args"]
        if a.startswith("run.dir=")
    )
    assert args[:3] == ["rec", "handoff", "publish"]
    assert args[args.index("--run") + 1] == rl_dir.split("=", 1)[1]
    assert args[args.index("--tag") + 1] == "rl_last"


def test_grpo_rollout_fast_paths_default_on_and_env_turns_them_off(tmp_path):
    def flags(environ):
        out = tmp_path / str(len(list(tmp_path.iterdir())))
        render.render_all("dev", "industrial", None, out, environ=environ)
        doc = manifests.read_rendered(out / "grpo-gsm8k/train.yaml")[0]
        return {e["name"]: e.get("value") for e in _env_list(doc) if e["name"].startswith("ROLLOUT_")}

    assert flags({}) == {"ROLLOUT_FAST_GENERATE": "1", "ROLLOUT_FAST_QWEN2_DECODE_ATTENTION": "1"}
    assert flags({"ROLLOUT_FAST_GENERATE": "0"}) == {
        "ROLLOUT_FAST_GENERATE": "0",
        "ROLLOUT_FAST_QWEN2_DECODE_ATTENTION": "1",
    }
    assert flags({"ROLLOUT_FAST_QWEN2_DECODE_ATTENTION": "0", "ROLLOUT_FAST_GENERATE": "1"}) == {
        "ROLLOUT_FAST_GENERATE": "1",
        "ROLLOUT_FAST_QWEN2_DECODE_ATTENTION": "0",
    }
    with pytest.raises(RecError, match="ROLLOUT_FAST_GENERATE='maybe'"):
        flags({"ROLLOUT_FAST_GENERATE": "maybe"})


def test_workflow_is_a_dag_of_the_same_objects(rendered):
    wf = rendered[1]["industrial/workflow.yaml"][0]
    dag = wf["spec"]["templates"][0]["dag"]["tasks"]
    after = "{0}-done.Succeeded && ({0}.Succeeded || {0}.Skipped)"
    assert [(t["name"], t.get("depends")) for t in dag] == [
        ("sft-done", None),
        ("sft", "sft-done.Succeeded"),
        ("rl-done", after.format("sft")),
        ("rl", "rl-done.Succeeded"),
        ("upload-done", after.format("rl")),
        ("upload", "upload-done.Succeeded"),
        ("eval-done", after.format("upload")),
        ("eval", "eval-done.Succeeded"),
    ]
    for task in dag[1::2]:
        assert task["when"] == f"{{{{tasks.{task['name']}-done.outputs.result}}}} != done"
    checks_args = {t["name"]: [p["value"] for p in t["arguments"]["parameters"]] for t in dag[::2]}
    assert checks_args["eval-done"] == ["eval", "gs://example-rec-artifacts/runs/industrial/r1/eval", "test"]
    templates = {t["name"]: t for t in wf["spec"]["templates"][1:]}
    assert templates["outputs-check"]["serviceAccountName"] == "rec-runner"
    assert templates["outputs-check"]["container"]["args"][:3] == ["rec", "outputs", "check"]
    assert yaml.safe_load(templates["rl"]["resource"]["manifest"]) == _doc(
        rendered, "industrial/train.yaml", "rl"
    )
    for name in ("sft", "rl", "upload", "eval"):
        assert templates[name]["resource"]["action"] == "apply"  # adopts an existing object
        assert templates[name]["retryStrategy"]["retryPolicy"] == "OnError"
    assert templates["eval"]["resource"]["successCondition"] == "status.terminalState == Completed"
    assert templates["eval"]["resource"]["failureCondition"] == "status.terminalState == Failed"
    assert templates["upload"]["resource"]["failureCondition"] == "status.failed > 2"


def test_render_is_deterministic(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    render.render_all("dev", "all", None, a, environ={})
    render.render_all("dev", "all", None, b, environ={})
    files_a = sorted(p.relative_to(a) for p in a.rglob("*.yaml"))
    assert files_a == sorted(p.relative_to(b) for p in b.rglob("*.yaml"))
    for rel in files_a:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_committed_rendered_manifests_are_up_to_date(tmp_path):
    committed = ROOT / "k8s" / "rendered"
    if not committed.is_dir():
        pytest.skip("k8s/rendered not present")
    render.render_all("dev", "all", None, tmp_path, environ={})
    for path in sorted(tmp_path.rglob("*.yaml")):
        rel = path.relative_to(tmp_path)
        assert (committed / rel).read_bytes() == path.read_bytes(), (
            f"k8s/rendered/{rel} is stale: run `make render DATASET=all`"
        )


def test_render_and_validate_cli(tmp_path, capsys):
    assert render.main(["render", "--dataset", "office", "--out", str(tmp_path), "--run", "exp7"]) == 0
    assert "office/train.yaml" in capsys.readouterr().out
    assert manifests.read_rendered(tmp_path / "office/train.yaml")[0]["metadata"]["name"] == "sft-office-exp7"
    assert render.main(["validate", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.startswith("ok: 7 file(s) valid")


# ---------------------------------------------------------------------------------------------
# Validation: the good manifests pass every layer


def test_every_rendered_document_passes_all_checks(rendered, jobset_crd):
    for path, docs in rendered[1].items():
        for doc in docs:
            assert checks.check_document(doc, jobset_crd) == [], f"{path}: {checks.object_label(doc)}"


def test_strict_crd_schema_catches_unknown_and_mistyped_fields(rendered, jobset_crd):
    js = _doc(rendered, "industrial/train.yaml", "sft")
    js["spec"]["replicatedJobs"][0]["template"]["spec"]["paralelism"] = 4
    js["spec"]["failurePolicy"]["bogus"] = 1
    js["spec"]["replicatedJobs"][0]["replicas"] = "one"
    problems = checks.check_crd_schema(js, jobset_crd)
    assert any("'paralelism' was unexpected" in p for p in problems)
    assert any("'bogus' was unexpected" in p for p in problems)
    assert any("replicas: 'one' is not of type 'integer'" in p for p in problems)


def test_batch_v1_catches_errors_in_embedded_and_plain_jobs(rendered):
    js = _doc(rendered, "industrial/train.yaml", "sft")
    js["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0][
        "imagePullPolicy"
    ] = ["x"]
    assert any(p.startswith("[batch-v1] replicatedJobs[slice].template:") for p in checks.check_batch_job(js))
    job = _doc(rendered, "industrial/upload.yaml", "upload")
    job["spec"]["template"]["spec"]["restartPolicyy"] = "Never"
    assert any("restartPolicyy" in p for p in checks.check_batch_job(job))


def _set(path: list, value):
    def mutate(doc):
        target = doc
        for key in path[:-1]:
            target = target[key]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value

    return mutate


_DELETE = object()
_RJ = ["spec", "replicatedJobs", 0, "template", "spec"]
_POD = _RJ + ["template", "spec"]
_C0 = _POD + ["containers", 0]


def _env_set(name, value):
    def mutate(doc):
        env = _container(doc)["env"]
        env[:] = [e for e in env if e["name"] != name]
        if value is not _DELETE:
            env.append(value if isinstance(value, dict) else {"name": name, "value": value})

    return mutate


def _both(*fns):
    def mutate(doc):
        for fn in fns:
            fn(doc)

    return mutate


# (rule, file, component, mutation, expected message fragment): one broken manifest per rule check.
BROKEN = [
    (
        "tpu-topology",
        "industrial/train.yaml",
        "sft",
        _both(
            _set(_C0 + ["resources", "limits", "google.com/tpu"], 8),
            _set(_C0 + ["resources", "requests", "google.com/tpu"], 8),
        ),
        "4 host(s) x 8 chips = 32, but topology 4x4 has 16 chips",
    ),
    (
        "tpu-topology",
        "industrial/train.yaml",
        "rl",
        _both(_set(_RJ + ["parallelism"], 2), _set(_RJ + ["completions"], 2)),
        "2 host(s) x 4 chips = 8, but topology 4x4 has 16",
    ),
    (
        "tpu-topology",
        "industrial/train.yaml",
        "sft",
        _set(_C0 + ["resources", "requests", "google.com/tpu"], 2),
        "requests 2 != limits 4",
    ),
    (
        "tpu-topology",
        "office/eval.yaml",
        "eval",
        _set(_POD + ["nodeSelector", "node.kubernetes.io/instance-type"], _DELETE),
        "needs nodeSelector node.kubernetes.io/instance-type: ct6e-standard-8t",
    ),
    (
        "tpu-topology",
        "office/eval.yaml",
        "eval",
        _set(_POD + ["nodeSelector", "cloud.google.com/gke-tpu-topology"], "4x4"),
        "1 host(s) x 8 chips = 8, but topology 4x4 has 16",
    ),
    (
        "tpu-selectors",
        "industrial/train.yaml",
        "sft",
        _set(_POD + ["nodeSelector", "cloud.google.com/gke-tpu-accelerator"], _DELETE),
        "gke-tpu-accelerator must be tpu-v6e-slice",
    ),
    (
        "tpu-selectors",
        "industrial/train.yaml",
        "sft",
        _set(_POD + ["tolerations"], []),
        "no toleration for the google.com/tpu taint",
    ),
    (
        "slice-job",
        "industrial/train.yaml",
        "sft",
        _set(_RJ + ["completions"], 3),
        "parallelism 4 != completions 3",
    ),
    ("slice-job", "industrial/train.yaml", "sft", _set(_RJ + ["backoffLimit"], 3), "backoffLimit must be 0"),
    (
        "slice-job",
        "industrial/train.yaml",
        "rl",
        _set(_POD + ["restartPolicy"], "OnFailure"),
        "restartPolicy must be Never",
    ),
    (
        "host-network-dns",
        "industrial/train.yaml",
        "sft",
        _both(_set(_POD + ["hostNetwork"], True), _set(_POD + ["dnsPolicy"], "ClusterFirst")),
        "needs dnsPolicy: ClusterFirstWithHostNet",
    ),
    (
        "exclusive-placement",
        "industrial/train.yaml",
        "sft",
        _set(["metadata", "annotations", "alpha.jobset.sigs.k8s.io/exclusive-topology"], _DELETE),
        "exclusive-topology",
    ),
    (
        "name-length",
        "industrial/train.yaml",
        "sft",
        _set(["metadata", "name"], "sft-" + "x" * 44),
        "generated pod name",
    ),
    ("name-length", "industrial/train.yaml", "sft", _set(["metadata", "name"], "9sft"), "not DNS-1035"),
    (
        "name-length",
        "industrial/upload.yaml",
        "upload",
        _set(["metadata", "name"], "u" * 60),
        "pod names <job>-xxxxx",
    ),
    (
        "env",
        "industrial/train.yaml",
        "sft",
        _env_set("JAX_PLATFORMS", _DELETE),
        "JAX_PLATFORMS must be 'tpu'",
    ),
    (
        "env",
        "industrial/upload.yaml",
        "upload",
        _env_set("JAX_PLATFORMS", "tpu"),
        "JAX_PLATFORMS must be 'cpu'",
    ),
    (
        "env",
        "industrial/train.yaml",
        "sft",
        _env_set(
            "WANDB_API_KEY",
            {"name": "WANDB_API_KEY", "valueFrom": {"secretKeyRef": {"name": "w", "key": "k"}}},
        ),
        "must be optional: true",
    ),
    (
        "env",
        "industrial/train.yaml",
        "sft",
        _env_set("WANDB_API_KEY", "secret-in-git"),
        "must come from a Secret",
    ),
    (
        "env",
        "grpo-gsm8k/train.yaml",
        "grpo",
        _env_set("ROLLOUT_FAST_GENERATE", _DELETE),
        "GRPO needs env ROLLOUT_FAST_GENERATE",
    ),
    (
        "gcsfuse",
        "industrial/train.yaml",
        "sft",
        _set(_RJ + ["template", "metadata", "annotations", "gke-gcsfuse/volumes"], _DELETE),
        'annotation gke-gcsfuse/volumes: "true"',
    ),
    (
        "gcsfuse",
        "industrial/train.yaml",
        "sft",
        _set(_POD + ["hostNetwork"], True),
        "hostNetworkPodKSA",
    ),
    (
        "host-network-identity",
        "industrial/train.yaml",
        "sft",
        _set(_POD + ["hostNetwork"], True),
        "node's service account, not the pod's",
    ),
    (
        "host-network-identity",
        "industrial/eval.yaml",
        "eval",
        _set(_POD + ["hostNetwork"], True),  # eval's gs:// paths are in env values
        "node's service account, not the pod's",
    ),
    (
        "exit-codes",
        "industrial/train.yaml",
        "sft",
        _set(_RJ + ["podFailurePolicy", "rules", 1, "onExitCodes", "values"], [2, 126, 127]),
        "must FailJob on exit codes [2, 3, 126, 127]",
    ),
    (
        "exclusive-placement",
        "industrial/eval.yaml",
        "eval",
        _set(["metadata", "annotations", "alpha.jobset.sigs.k8s.io/exclusive-topology"], "cloud.google.com/gke-nodepool"),
        "drop annotation",
    ),
    (
        "waits-for-input",
        "industrial/train.yaml",
        "rl",
        _set(_POD + ["initContainers"], _DELETE),
        "rec outputs wait run gs://example-rec-artifacts/runs/industrial/r1/sft",
    ),
    (
        "waits-for-input",
        "industrial/upload.yaml",
        "upload",
        _set(["spec", "template", "spec", "initContainers", 0, "args", 4], "gs://elsewhere/rl"),
        "rec outputs wait run gs://example-rec-artifacts/runs/industrial/r1/rl",
    ),
    (
        "waits-for-input",
        "industrial/eval.yaml",
        "eval",
        _set(_POD + ["initContainers"], _DELETE),
        "rec outputs wait handoff gs://example-rec-artifacts/handoff/industrial/r1/rl_last",
    ),
    (
        "gcsfuse",
        "industrial/train.yaml",
        "sft",
        _set(_RJ + ["template", "metadata", "annotations", "gke-gcsfuse/memory-limit"], "1Gi"),
        'memory-limit should be "0"',
    ),
    (
        "failure-policy",
        "industrial/train.yaml",
        "sft",
        _set(["spec", "failurePolicy", "maxRestarts"], 0),
        "maxRestarts must be 1..10",
    ),
    (
        "failure-policy",
        "industrial/train.yaml",
        "rl",
        _set(["spec", "failurePolicy"], _DELETE),
        "maxRestarts must be 1..10",
    ),
    (
        "failure-policy",
        "industrial/train.yaml",
        "rl",
        _set(["spec", "failurePolicy", "rules", 0, "name"], "infra-disruption"),
        "rule name 'infra-disruption' must match",
    ),
    (
        "ttl",
        "industrial/train.yaml",
        "sft",
        _set(["spec", "ttlSecondsAfterFinished"], 60),
        "ttlSecondsAfterFinished must be >= 3600",
    ),
    (
        "ttl",
        "industrial/upload.yaml",
        "upload",
        _set(["spec", "ttlSecondsAfterFinished"], _DELETE),
        "got None",
    ),
    (
        "workload-identity",
        "industrial/train.yaml",
        "sft",
        _set(_POD + ["serviceAccountName"], _DELETE),
        "serviceAccountName",
    ),
    (
        "workload-identity",
        "industrial/upload.yaml",
        "upload",
        _set(["spec", "template", "spec", "serviceAccountName"], "default"),
        "serviceAccountName",
    ),
    (
        "checkpoints-gcs",
        "industrial/train.yaml",
        "sft",
        lambda d: _container(d).update(
            args=[a.replace("run.dir=gs://", "run.dir=/tmp/") for a in _container(d)["args"]]
        ),
        "run.dir must be a gs:// prefix",
    ),
    ("shm", "industrial/train.yaml", "rl", _set(_POD + ["volumes", 0, "emptyDir"], {}), "/dev/shm"),
    (
        "image",
        "industrial/train.yaml",
        "sft",
        _set(_C0 + ["image"], "us-docker.pkg.dev/p/rec/rec:latest"),
        ":latest",
    ),
    (
        "image",
        "industrial/upload.yaml",
        "upload",
        _set(["spec", "template", "spec", "containers", 0, "image"], "rec"),
        "tag or digest",
    ),
    (
        "verified-handoff",
        "industrial/eval.yaml",
        "eval",
        _set(_C0 + ["args"], ["rec", "eval", "--config", "x"]),
        "rec handoff verify",
    ),
    (
        "verified-handoff",
        "industrial/eval.yaml",
        "eval",
        _env_set("REC_HANDOFF", "/tmp/handoff"),
        "REC_HANDOFF must be the gs://",
    ),
    (
        "verified-handoff",
        "industrial/eval.yaml",
        "eval",
        _set(
            _C0 + ["args"],
            ["bash", "-c", 'rec handoff verify "$REC_HANDOFF"\nrec eval "model.path=$REC_HANDOFF"'],
        ),
        "must stop the script",
    ),
    (
        "upload-job",
        "industrial/upload.yaml",
        "upload",
        _set(["spec", "template", "spec", "containers", 0, "args"], ["rec", "eval"]),
        "rec handoff publish",
    ),
]


@pytest.mark.parametrize(
    "rule,path,component,mutate,fragment", BROKEN, ids=[f"{b[0]}-{i}" for i, b in enumerate(BROKEN)]
)
def test_each_gke_rule_rejects_a_broken_manifest(rendered, rule, path, component, mutate, fragment):
    doc = _doc(rendered, path, component)
    assert checks.GKE_RULES[rule](doc) == [], "the good manifest must pass"
    mutate(doc)
    messages = checks.GKE_RULES[rule](doc)
    assert any(fragment in m for m in messages), messages
    assert any(p.startswith(f"[{rule}]") for p in checks.check_gke_rules(doc))


def test_every_rule_has_a_broken_manifest_test():
    assert {b[0] for b in BROKEN} == set(checks.GKE_RULES)


def test_workflow_and_argocd_checks(rendered):
    wf = copy.deepcopy(rendered[1]["industrial/workflow.yaml"][0])
    assert checks.check_document(wf, None) == []
    wf["spec"]["templates"][0]["dag"]["tasks"][2]["depends"] = "train.Succeeded"
    wf["spec"]["templates"][2]["resource"].pop("failureCondition")
    problems = checks.check_document(wf, None)
    assert any("depends on unknown task 'train'" in p for p in problems)
    assert any("needs successCondition and failureCondition" in p for p in problems)
    wf = copy.deepcopy(rendered[1]["industrial/workflow.yaml"][0])
    wf["spec"]["templates"][2]["resource"]["action"] = "create"
    wf["spec"]["templates"][3]["retryStrategy"]["retryPolicy"] = "Always"
    del wf["spec"]["templates"][0]["dag"]["tasks"][5]["when"]
    problems = checks.check_document(wf, None)
    assert any("'sft': action must be apply" in p for p in problems)
    assert any("'rl': needs retryStrategy.retryPolicy OnError" in p for p in problems)
    assert any("task 'upload': must run only `when` task 'upload-done'" in p for p in problems)
    wf = copy.deepcopy(rendered[1]["industrial/workflow.yaml"][0])
    manifest = yaml.safe_load(wf["spec"]["templates"][2]["resource"]["manifest"])
    manifest["spec"]["replicatedJobs"][0]["template"]["spec"]["backoffLimit"] = 1
    wf["spec"]["templates"][2]["resource"]["manifest"] = yaml.safe_dump(manifest)
    assert any(
        p.startswith("embedded JobSet/sft-industrial-r1: [slice-job]")
        for p in checks.check_document(wf, None)
    )
    app = copy.deepcopy(rendered[1]["argocd/application.yaml"][0])
    assert checks.check_document(app) == []
    app["spec"]["syncPolicy"]["automated"]["selfHeal"] = True
    app["spec"]["source"]["directory"]["include"] = "*"
    problems = checks.check_document(app)
    assert any("selfHeal" in p for p in problems) and any("only */workflow.yaml" in p for p in problems)


def test_cluster_setup_is_checked_as_builtin_kinds(rendered):
    docs = copy.deepcopy(rendered[1]["cluster/setup.yaml"])
    assert [d["kind"] for d in docs] == [
        "Namespace",
        "ServiceAccount",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "Role",
        "RoleBinding",
    ]
    # the pods' service account may only report task results, never create JobSets
    assert docs[6]["subjects"][0]["name"] == docs[1]["metadata"]["name"]
    assert [r["resources"] for r in docs[5]["rules"]] == [["workflowtaskresults"]]
    assert all(checks.check_document(d) == [] for d in docs)
    docs[3]["rules"][0]["verb"] = ["get"]
    assert any(p.startswith("[k8s-schema]") and "verb" in p for p in checks.check_document(docs[3]))
    # the Workflow's service account may create exactly what the Workflow creates
    wf = rendered[1]["industrial/workflow.yaml"][0]
    assert wf["spec"]["serviceAccountName"] == docs[2]["metadata"]["name"] == docs[4]["subjects"][0]["name"]
    allowed = {
        (g, r)
        for rule in docs[3]["rules"]
        if "create" in rule["verbs"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
    }
    for template in wf["spec"]["templates"][1:]:
        if "resource" not in template:
            continue
        assert {"get", "patch"} <= {v for rule in docs[3]["rules"] for v in rule["verbs"]}  # apply
        manifest = yaml.safe_load(template["resource"]["manifest"])
        group = manifest["apiVersion"].split("/")[0] if "/" in manifest["apiVersion"] else ""
        assert (group, manifest["kind"].lower() + "s") in allowed


def test_validate_reports_file_object_and_rule_and_fails(tmp_path, capsys):
    render.render_all("dev", "industrial", None, tmp_path, environ={})
    path = tmp_path / "industrial/eval.yaml"
    doc = manifests.read_rendered(path)[0]
    doc["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]["containers"][0]["resources"][
        "limits"
    ]["google.com/tpu"] = 4
    path.write_text(yaml.safe_dump(doc))
    assert render.main(["validate", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "industrial/eval.yaml: JobSet/eval-industrial-r1: [tpu-topology]" in err
    # the Workflow no longer matches the standalone file either
    assert "[workflow] embedded JobSet/eval-industrial-r1 differs" in err
    assert err.strip().splitlines()[-1].startswith("error: ") and "problem(s)" in err


# ---------------------------------------------------------------------------------------------
# Hostile values: rejected before rendering, with one clear line


@pytest.fixture
def values_dir(tmp_path):
    target = tmp_path / "values"
    shutil.copytree(ROOT / "k8s" / "values", target)
    return target


def _edit(path: pathlib.Path, key: str, value) -> None:
    data = yaml.safe_load(path.read_text())
    data[key] = value
    path.write_text(yaml.safe_dump(data))


HOSTILE = [
    (
        "env/dev.yaml",
        "bucket",
        "ok-bucket\nhostNetwork: true",
        "'bucket' = 'ok-bucket\\nhostNetwork: true': not a valid GCS bucket name",
    ),
    ("env/dev.yaml", "bucket", "my-google-bucket", "may not start with 'goog' or contain 'google'"),
    ("env/dev.yaml", "bucket", "gs://bucket", "without gs://"),
    ("env/dev.yaml", "bucket", "192.168.1.1", "IP addresses"),
    (
        "env/dev.yaml",
        "namespace",
        "rec\n  privileged: true",
        "'namespace' = 'rec\\n  privileged: true': not a DNS-1123 label",
    ),
    ("env/dev.yaml", "namespace", "Rec", "not a DNS-1123 label"),
    ("env/dev.yaml", "image", "reg.io/rec:1 # {evil: yes}", "not a container image reference"),
    ("env/dev.yaml", "image", "reg.io/rec", "give a tag or digest"),
    ("env/dev.yaml", "image", "reg.io/rec:latest", "':latest' is not reproducible"),
    ("env/dev.yaml", "run", "r1: {a: b}", "'run' = 'r1: {a: b}': not a DNS-1123 label"),
    ("env/dev.yaml", "run", "a" * 21, "at most 20 characters"),
    ("env/dev.yaml", "service_account", "sa\n- name: x", "not a DNS-1123 name"),
    ("env/dev.yaml", "max_restarts", 1000, "expected an integer in [0, 10]"),
    ("env/dev.yaml", "max_restarts", "3", "expected an integer"),
    ("env/dev.yaml", "privileged", "yes", "expected true or false"),
    ("env/dev.yaml", "extra_env", {"A B": "x"}, "is not an environment variable name"),
    ("env/dev.yaml", "extra_env", {"A": "x\ny"}, "control characters"),
    ("env/dev.yaml", "extra_env", {"A": "{{workflow.name}}"}, "Argo template syntax"),
    ("env/dev.yaml", "repo_url", "http://x y", "expected an https:// repository URL"),
    ("env/dev.yaml", "surprise", 1, "unknown key 'surprise'"),
    ("dataset/industrial.yaml", "data_dir", "../../etc", "no '..'"),
    ("dataset/industrial.yaml", "data_dir", "/abs/path", "no leading '/'"),
    ("dataset/industrial.yaml", "sft_config", "configs/sft/x.yaml\n---\nkind: Pod", "contains a line break"),
    ("dataset/industrial.yaml", "sft_config", "other/x.yaml", "expected configs/<stage>/<name>.yaml"),
    ("dataset/industrial.yaml", "handoff_tag", "rl last", "expected a checkpoint tag"),
    ("dataset/industrial.yaml", "name", "office", "must equal the file name"),
]


@pytest.mark.parametrize(
    "file,key,value,fragment", HOSTILE, ids=[f"{h[1]}-{i}" for i, h in enumerate(HOSTILE)]
)
def test_hostile_values_are_rejected_with_one_line(values_dir, tmp_path, file, key, value, fragment):
    _edit(values_dir / file, key, value)
    with pytest.raises(RecError) as info:
        render.render_all("dev", "industrial", None, tmp_path / "out", values_dir=values_dir, environ={})
    message = str(info.value)
    assert fragment in message, message
    assert "\n" not in message and file.split("/")[0] in message
    assert not (tmp_path / "out").exists(), "nothing may be written when a value is rejected"


@pytest.mark.parametrize(
    "argv,fragment",
    [
        (["--dataset", "../values/env/dev"], "--dataset = '../values/env/dev': not a DNS-1123 label"),
        (["--dataset", "nosuch"], "dataset/nosuch.yaml: values file not found"),
        (["--env", "prod\nx"], "--env = 'prod\\nx'"),
        (["--run", "R1"], "--run / RUN = 'R1': not a DNS-1123 label"),
    ],
)
def test_hostile_command_line_values(tmp_path, capsys, argv, fragment):
    assert render.main(["render", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1


def test_templates_cannot_splice_raw_text(tmp_path):
    """Even a value that bypassed validation lands as one string: the structure cannot change."""
    hostile = 'x"\nspec: {hostNetwork: true}\n# '
    (tmp_path / "t.yaml.j2").write_text(
        "kind: Pod\nmetadata:\n  name: {{ name | q }}\n  labels:\n    a: {{ n | q }}\n"
    )
    docs = manifests.render_template("t.yaml.j2", {"name": hostile, "n": 3}, templates_dir=tmp_path)
    assert docs == [{"kind": "Pod", "metadata": {"name": hostile, "labels": {"a": 3}}}]
    (tmp_path / "raw.yaml.j2").write_text("kind: Pod\nmetadata:\n  name: {{ name }}\n")
    with pytest.raises(RecError, match=r"inserted without the \|q filter"):
        manifests.render_template("raw.yaml.j2", {"name": "ok"}, templates_dir=tmp_path)


def test_validate_rejects_unparsable_files(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: JobSet\nmetadata: {name: [unclosed\n")
    assert render.main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml: not valid YAML" in err


def test_validate_rejects_non_utf8_files(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfekind: JobSet\n")
    assert render.main(["validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "UnicodeDecodeError" not in err
    assert f"{bad}: not UTF-8 text (byte 0)" in err


# ---------------------------------------------------------------------------------------------
# --crd: a file the user names must exist and be the JobSet CRD


def _rendered_out(tmp_path) -> pathlib.Path:
    out = tmp_path / "out"
    render.render_all("dev", "industrial", None, out, environ={})
    return out


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def test_validate_named_crd_that_does_not_exist_is_an_error(tmp_path, capsys):
    out = _rendered_out(tmp_path)
    missing = tmp_path / "no-such-crd.yaml"
    assert render.main(["validate", "--out", str(out), "--crd", str(missing)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(missing) in line and "not found" in line


def test_run_with_named_crd_that_does_not_exist_writes_nothing(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["train", "--dry-run", "--dataset", "industrial", "--out", str(out), "--crd", str(tmp_path / "x.yaml")]
    assert render.main(argv) == 2
    assert "x.yaml" in _one_error_line(capsys.readouterr().err)
    assert not out.exists(), "nothing may be rendered when --crd is unusable"


def test_default_crd_location_absent_skips_the_schema_check(tmp_path, capsys, monkeypatch):
    """Outside the workspace ../shared/k8s/ does not exist: the default CRD is skipped, with a note."""
    out = _rendered_out(tmp_path)
    monkeypatch.setattr(checks, "CRD_PATH", tmp_path / "shared/k8s/jobset.x-k8s.io_jobsets.yaml")
    assert render.main(["validate", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "JobSet CRD schema check skipped" in captured.err
    assert "JobSet CRD schema skipped" in captured.out


def test_named_crd_is_used(tmp_path, capsys, jobset_crd):
    out = _rendered_out(tmp_path)
    crd = tmp_path / "crd.yaml"
    shutil.copy(jobset_crd, crd)
    assert render.main(["validate", "--out", str(out), "--crd", str(crd)]) == 0
    assert "JobSet CRD schema strict" in capsys.readouterr().out
    # ...and it really is the schema the JobSets are checked against
    path = out / "industrial/train.yaml"
    docs = manifests.read_rendered(path)
    docs[0]["spec"]["surprise"] = 1
    path.write_text(yaml.safe_dump_all(docs))
    assert render.main(["validate", str(path), "--crd", str(crd)]) == 2
    assert "[jobset-crd] spec: Additional properties are not allowed ('surprise'" in capsys.readouterr().err


NOT_A_CRD = [
    ("rec-config", (ROOT / "configs/eval/industrial-v6e8.yaml").read_text(), "expected kind: CustomResourceDefinition"),
    ("empty", "", "expected kind: CustomResourceDefinition"),
    ("list", "- a\n- b\n", "expected kind: CustomResourceDefinition"),
    (
        "other-crd",
        "kind: CustomResourceDefinition\nmetadata: {name: widgets.example.com}\nspec: {versions: []}\n",
        "metadata.name is 'widgets.example.com'",
    ),
    (
        "no-spec",
        "kind: CustomResourceDefinition\nmetadata: {name: jobsets.jobset.x-k8s.io}\n",
        "spec.versions is missing",
    ),
    (
        "no-v1alpha2",
        "kind: CustomResourceDefinition\nmetadata: {name: jobsets.jobset.x-k8s.io}\n"
        "spec: {versions: [{name: v1, schema: {openAPIV3Schema: {type: object}}}]}\n",
        "no spec.versions[v1alpha2].schema.openAPIV3Schema (versions: v1)",
    ),
    ("not-yaml", "kind: [unclosed\n", "not valid YAML"),
    ("not-utf8", b"\xff\xfekind: CustomResourceDefinition\n", "not UTF-8 text"),
]


@pytest.mark.parametrize("content,fragment", [c[1:] for c in NOT_A_CRD], ids=[c[0] for c in NOT_A_CRD])
@pytest.mark.parametrize("action", ["validate", "train"])
def test_named_crd_that_is_not_the_jobset_crd_is_one_line(tmp_path, capsys, content, fragment, action):
    crd = tmp_path / "crd.yaml"
    crd.write_bytes(content.encode() if isinstance(content, str) else content)
    out = _rendered_out(tmp_path) if action == "validate" else tmp_path / "fresh"
    argv = ["validate", "--out", str(out)] if action == "validate" else ["train", "--dry-run", "--out", str(out)]
    assert render.main([*argv, "--crd", str(crd)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{crd}: " in line and fragment in line, line
    if action == "train":
        assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Values files that cannot be read


def test_non_utf8_values_file_is_one_line(tmp_path, capsys, monkeypatch, checkout):
    (checkout / "k8s/values/env/bom.yaml").write_bytes(b"\xff\xfeproject: x\n")
    monkeypatch.setattr(values, "VALUES_DIR", checkout / "k8s/values")
    out = tmp_path / "out"
    assert render.main(["render", "--env", "bom", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "k8s/values/env/bom.yaml: not UTF-8 text (byte 0)" in line
    assert not out.exists()


# ---------------------------------------------------------------------------------------------
# Run configs named by the dataset values: present, loadable, of the right stage; a handoff tag the
# pipeline produces


@pytest.fixture
def checkout(tmp_path):
    """A copy of what the renderer reads from the checkout: k8s/values/ and configs/."""
    root = tmp_path / "checkout"
    shutil.copytree(ROOT / "k8s" / "values", root / "k8s" / "values")
    shutil.copytree(ROOT / "configs", root / "configs")
    return root


def _write_config(root: pathlib.Path, rel: str, based_on: str, section: str, key: str, value) -> str:
    data = yaml.safe_load((ROOT / based_on).read_text())
    if value is _DELETE:
        data[section].pop(key)
    else:
        data.setdefault(section, {})[key] = value
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    (root / rel).write_text(yaml.safe_dump(data))
    return rel


SFT = "configs/sft/industrial-v6e16.yaml"
RL = "configs/rl/industrial-v6e16.yaml"
EVAL = "configs/eval/industrial-v6e8.yaml"


def _render_checkout(root: pathlib.Path, out: pathlib.Path, dataset: str = "industrial"):
    return render.render_all(
        "dev", dataset, None, out, values_dir=root / "k8s/values", environ={}, config_root=root
    )


def test_every_committed_dataset_names_loadable_configs_of_the_right_stage():
    names = values.list_datasets()
    assert {"industrial", "office"} <= set(names)
    for name in names:
        ds = values.load_dataset(name)  # raises on any problem
        assert ds.handoff_tag in ("rl_last", "rl_best")
        assert values.eval_config_problem(ds.eval_config, ROOT) == ""


def _bad_dataset_cases():
    # (values key, value or callable(root) -> value, fragment of the message)
    return [
        ("sft_config", "configs/sft/nope.yaml", "'sft_config' = 'configs/sft/nope.yaml': no such file"),
        ("rl_config", "configs/rl/nope.yaml", "'rl_config' = 'configs/rl/nope.yaml': no such file"),
        ("eval_config", "configs/eval/nope.yaml", "'eval_config' = 'configs/eval/nope.yaml': no such file"),
        (
            "sft_config",
            lambda root: _write_config(root, "configs/sft/typo.yaml", SFT, "train", "batchsize", 1024),
            "'sft_config' = 'configs/sft/typo.yaml': unknown key 'train.batchsize' (did you mean 'train.batch_size'?)",
        ),
        (
            "rl_config",
            lambda root: _write_config(root, "configs/rl/bad.yaml", RL, "rl", "generations", "many"),
            "'rl_config' = 'configs/rl/bad.yaml': 'rl.generations': expected an integer, got 'many'",
        ),
        (
            "eval_config",
            lambda root: _write_config(root, "configs/eval/bad.yaml", EVAL, "eval", "beams", 0),
            "'eval_config' = 'configs/eval/bad.yaml': config: 'eval.beams' must be positive",
        ),
        ("eval_config", SFT, "'eval_config' = 'configs/sft/industrial-v6e16.yaml': sets train, checkpoint"),
        ("eval_config", RL, "this is a rl (training) config, not an eval config"),
        ("handoff_tag", "rl_lst", "'handoff_tag' = 'rl_lst': not a tag the RL run produces"),
        ("handoff_tag", "sft_best", "'handoff_tag' = 'sft_best': not a tag the RL run produces"),
    ]


BAD_DATASET_IDS = ["sft-missing", "rl-missing", "eval-missing", "sft-typo", "rl-bad-type", "eval-bad-value",
                   "eval-is-sft", "eval-is-rl", "tag-typo", "tag-sft"]


@pytest.mark.parametrize("key,value,fragment", _bad_dataset_cases(), ids=BAD_DATASET_IDS)
def test_dataset_configs_are_checked_before_rendering(checkout, tmp_path, key, value, fragment):
    value = value(checkout) if callable(value) else value
    _edit(checkout / "k8s/values/dataset/industrial.yaml", key, value)
    with pytest.raises(RecError) as info:
        _render_checkout(checkout, tmp_path / "out")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{checkout / 'k8s/values/dataset/industrial.yaml'}: ") and fragment in message, message
    assert not (tmp_path / "out").exists(), "nothing may be written when a config is rejected"


def test_rl_best_handoff_needs_rl_best_metric(checkout, tmp_path):
    ds = checkout / "k8s/values/dataset/industrial.yaml"
    _edit(ds, "handoff_tag", "rl_best")
    _render_checkout(checkout, tmp_path / "ok")  # the committed RL config sets rl.best_metric
    _edit(ds, "rl_config", _write_config(checkout, "configs/rl/nobest.yaml", RL, "rl", "best_metric", _DELETE))
    with pytest.raises(RecError, match=r"'handoff_tag' = 'rl_best': the RL run writes rl_best only when "
                       r"rl.best_metric is set, and configs/rl/nobest.yaml does not set it"):
        _render_checkout(checkout, tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_grpo_config_is_checked(checkout, tmp_path):
    _edit(checkout / "k8s/values/grpo/gsm8k.yaml", "config", "configs/grpo/nope.yaml")
    with pytest.raises(RecError, match=r"grpo/gsm8k.yaml: 'config' = 'configs/grpo/nope.yaml': no such file"):
        _render_checkout(checkout, tmp_path / "out")


@pytest.mark.parametrize("action", [["render"], ["train", "--dry-run"], ["pipeline", "--dry-run"]])
def test_cli_rejects_bad_dataset_configs_with_one_line(checkout, tmp_path, capsys, monkeypatch, action):
    monkeypatch.setattr(values, "VALUES_DIR", checkout / "k8s/values")
    monkeypatch.setattr(values, "CONFIG_ROOT", checkout)
    typo = _write_config(checkout, "configs/sft/typo.yaml", SFT, "train", "batchsize", 1024)
    _edit(checkout / "k8s/values/dataset/industrial.yaml", "sft_config", typo)
    out = tmp_path / "out"
    assert render.main([*action, "--dataset", "industrial", "--out", str(out)]) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "k8s/values/dataset/industrial.yaml: 'sft_config' = 'configs/sft/typo.yaml': unknown key" in line
    assert not out.exists()


def _swap_in_rendered(out: pathlib.Path, old: str, new: str, files=("train.yaml", "eval.yaml", "upload.yaml")):
    for name in files:
        path = out / "industrial" / name
        path.write_text(path.read_text().replace(old, new))


RENDERED_BAD = [
    # (text replaced in the rendered files, by, the file, object and message expected)
    (SFT, "configs/sft/nope.yaml", "industrial/train.yaml: JobSet/sft-industrial-r1: [run-config] config = 'configs/sft/nope.yaml': no such file"),
    (SFT, "configs/sft/typo.yaml", "JobSet/sft-industrial-r1: [run-config] config = 'configs/sft/typo.yaml': unknown key 'train.batchsize'"),
    (EVAL, SFT, f"industrial/eval.yaml: JobSet/eval-industrial-r1: [run-config] config = '{SFT}': sets train, checkpoint"),
    ("rl_last", "rl_lst", "industrial/upload.yaml: Job/upload-industrial-r1: [run-config] handoff tag = 'rl_lst': not a tag"),
    (SFT, "/etc/passwd", "JobSet/sft-industrial-r1: [run-config] config = '/etc/passwd': expected a relative path"),
]


@pytest.mark.parametrize("old,new,fragment", RENDERED_BAD, ids=["missing", "typo", "eval-stage", "tag", "outside"])
def test_validate_checks_the_configs_the_manifests_name(checkout, tmp_path, capsys, monkeypatch, old, new, fragment):
    out = tmp_path / "out"
    _render_checkout(checkout, out)
    _write_config(checkout, "configs/sft/typo.yaml", SFT, "train", "batchsize", 1024)
    monkeypatch.setattr(values, "CONFIG_ROOT", checkout)
    paths = [out / "industrial" / n for n in ("train.yaml", "upload.yaml", "eval.yaml")]
    assert render.main(["validate", *map(str, paths)]) == 0, capsys.readouterr().err
    capsys.readouterr()
    _swap_in_rendered(out, old, new)
    assert render.main(["validate", *map(str, paths)]) == 2
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("error: ")
    assert "note:" not in err


def test_validate_checks_configs_embedded_in_a_lone_workflow(checkout, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    _render_checkout(checkout, out)
    monkeypatch.setattr(values, "CONFIG_ROOT", checkout)
    (checkout / RL).unlink()
    assert render.main(["validate", str(out / "industrial/workflow.yaml")]) == 2
    assert "[run-config] config = 'configs/rl/industrial-v6e16.yaml': no such file" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Identity, exit codes, single-pod placement, optional scheduling values, kubectl-apply order


def test_single_slice_jobsets_use_the_pod_network(rendered):
    for path, component in (("industrial/train.yaml", "sft"), ("industrial/train.yaml", "rl"),
                            ("grpo-gsm8k/train.yaml", "grpo"), ("industrial/eval.yaml", "eval")):
        pod = _pod(_doc(rendered, path, component))
        assert "hostNetwork" not in pod["spec"], (path, component)
        assert "rec/gcs-identity" not in (pod["metadata"].get("annotations") or {})
        attrs = pod["spec"]["volumes"][1]["csi"]["volumeAttributes"]
        assert "hostNetworkPodKSA" not in attrs


def test_host_network_needs_the_node_identity_granted_on_purpose(values_dir, tmp_path):
    env = values_dir / "env" / "dev.yaml"
    _edit(env, "tpu_host_network", True)
    with pytest.raises(RecError, match="'tpu_host_network' = true: with host networking Workload Identity"):
        render.render_all("dev", "industrial", None, tmp_path / "out", values_dir=values_dir, environ={})
    _edit(env, "tpu_host_network_node_identity", True)
    out = tmp_path / "out"
    render.render_all("dev", "industrial", None, out, values_dir=values_dir, environ={})
    sft = manifests.read_rendered(out / "industrial/train.yaml")[0]
    pod = _pod(sft)
    assert pod["spec"]["hostNetwork"] is True and pod["spec"]["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["metadata"]["annotations"]["rec/gcs-identity"] == "node-service-account"
    assert pod["spec"]["volumes"][1]["csi"]["volumeAttributes"]["hostNetworkPodKSA"] == "true"
    assert "hostNetwork" not in _pod(manifests.read_rendered(out / "industrial/eval.yaml")[0])["spec"]
    assert render.validate_files(sorted(out.rglob("*.yaml"))) == []


def test_fail_fast_exit_codes_come_from_rec_errors(rendered):
    from rec.errors import FAIL_FAST_EXIT_CODES

    for path, component in (("industrial/train.yaml", "sft"), ("industrial/eval.yaml", "eval"),
                            ("grpo-gsm8k/train.yaml", "grpo")):
        job = _doc(rendered, path, component)["spec"]["replicatedJobs"][0]["template"]["spec"]
        rec_rule = next(r for r in job["podFailurePolicy"]["rules"]
                        if (r.get("onExitCodes") or {}).get("containerName") == "rec")
        assert rec_rule["action"] == "FailJob" and rec_rule["onExitCodes"]["values"] == list(FAIL_FAST_EXIT_CODES)
        assert 143 not in FAIL_FAST_EXIT_CODES and 75 not in FAIL_FAST_EXIT_CODES and 1 not in FAIL_FAST_EXIT_CODES


def test_single_pod_eval_jobset_is_not_exclusive_per_node_pool(rendered):
    js = _doc(rendered, "industrial/eval.yaml", "eval")
    assert "alpha.jobset.sigs.k8s.io/exclusive-topology" not in js["metadata"]["annotations"]
    sft = _doc(rendered, "industrial/train.yaml", "sft")
    assert sft["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"] == "cloud.google.com/gke-nodepool"


def test_priority_class_and_kueue_queue_are_optional(rendered, values_dir, tmp_path):
    sft = _doc(rendered, "industrial/train.yaml", "sft")
    assert "priorityClassName" not in _pod(sft)["spec"]
    assert "kueue.x-k8s.io/queue-name" not in sft["metadata"]["labels"]
    env = values_dir / "env" / "dev.yaml"
    _edit(env, "priority_class", "medium")
    _edit(env, "kueue_queue", "tpu-v6e-queue")
    out = tmp_path / "out"
    render.render_all("dev", "industrial", None, out, values_dir=values_dir, environ={})
    for doc in manifests.read_rendered(out / "industrial/train.yaml"):
        assert _pod(doc)["spec"]["priorityClassName"] == "medium"
        assert doc["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tpu-v6e-queue"
    assert render.validate_files(sorted(out.rglob("*.yaml"))) == []
    _edit(env, "kueue_queue", "Not A Queue")
    with pytest.raises(RecError, match="'kueue_queue'"):
        render.render_all("dev", "industrial", None, out, values_dir=values_dir, environ={})


def test_each_later_step_waits_for_its_input_when_applied_together(rendered):
    """kubectl apply -f k8s/rendered/industrial/ creates everything at once: each later step's
    init container holds it until its input is finished."""
    root = "gs://example-rec-artifacts"
    expected = {
        ("industrial/train.yaml", "rl"): ["run", f"{root}/runs/industrial/r1/sft", "--timeout", "48h",
                                          "--start-timeout", "10m"],
        ("industrial/upload.yaml", "upload"): ["run", f"{root}/runs/industrial/r1/rl", "--timeout", "96h"],
        ("industrial/eval.yaml", "eval"): ["handoff", f"{root}/handoff/industrial/r1/rl_last", "--timeout", "120h"],
    }
    for (path, component), args in expected.items():
        init = _pod(_doc(rendered, path, component))["spec"]["initContainers"]
        assert [c["name"] for c in init] == ["wait-for-input"]
        assert init[0]["args"] == ["rec", "outputs", "wait", *args]
    assert "initContainers" not in _pod(_doc(rendered, "industrial/train.yaml", "sft"))["spec"]


ARGO_CRDS_PRESENT = all(path.is_file() for path, _, _ in checks.ARGO_CRDS.values())


@pytest.mark.skipif(not ARGO_CRDS_PRESENT, reason="../shared/k8s/ Argo CRDs not present")
@pytest.mark.parametrize(
    "file,mutate,fragment",
    [
        ("industrial/workflow.yaml", _set(["spec", "templates", 2, "retryStrategy", "retryPolicyy"], "OnError"),
         "[workflow-crd] spec.templates.2.retryStrategy: Additional properties are not allowed ('retryPolicyy'"),
        ("industrial/workflow.yaml", _set(["spec", "podGC", "strategy"], "OnSuccess"),
         "[workflow-crd] spec.podGC.strategy: 'OnSuccess' is not one of"),
        ("industrial/workflow.yaml", _set(["spec", "templates", 0, "dag", "tasks", 0, "dependss"], "x"),
         "[workflow-crd] spec.templates.0.dag.tasks.0: Additional properties are not allowed ('dependss'"),
        ("argocd/application.yaml", _set(["spec", "syncPolicy", "automatedd"], {}),
         "[application-crd] spec.syncPolicy: Additional properties are not allowed ('automatedd'"),
        ("argocd/application.yaml", _set(["spec", "destination", "server"], 7),
         "[application-crd] spec.destination.server: 7 is not of type 'string'"),
    ],
)
def test_argo_objects_are_validated_strictly_against_their_crds(rendered, file, mutate, fragment):
    doc = copy.deepcopy(rendered[1][file][0])
    assert checks.check_document(doc, None) == []
    mutate(doc)
    problems = checks.check_document(doc, None)
    assert any(fragment in p for p in problems), problems
