"""Submit, wait for and inspect JobSets and Jobs with the `kubernetes` Python client.

Only a handful of API calls are used (create/get of JobSets and Jobs, list pods), all through the
generic custom-objects path with plain dicts, so the client's typed models never re-interpret a
manifest. State comes from the objects' status:
  JobSet: status.terminalState (Completed | Failed), else the Completed/Failed conditions;
  Job:    the Complete/Failed conditions.
`run_steps` is the pipeline: a step whose outputs are already finished is skipped (whether or
not its object still exists: objects expire with their TTL); otherwise its object is created (or
found already there), waited for with progress, and the first failure stops everything with the
reason and the commands that show logs. Objects are created with server-side field validation
Strict, and `preflight` refuses a JobSet controller too old for the failure policy we render.
Polling survives transient API errors (connection resets, 429, 5xx) with backoff.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections.abc import Callable

from rec.errors import RecError
from tools.deploy.manifests import Step

JOBSET = ("jobset.x-k8s.io", "v1alpha2", "jobsets")
JOB = ("batch", "v1", "jobs")
POD_SELECTOR = {
    "JobSet": "jobset.sigs.k8s.io/jobset-name",
    "Job": "batch.kubernetes.io/job-name",
}
TERMINAL = ("Completed", "Failed")
TRANSIENT_HTTP = (408, 410, 429, 500, 502, 503, 504)
JOBSET_CRD = "jobsets.jobset.x-k8s.io"
# failurePolicy.rules[].onJobFailureMessagePatterns (our infrastructure-disruption rule) exists from
# JobSet v0.10.0; an older CRD prunes it silently, and then every failure would restart forever.
MIN_JOBSET_VERSION = "v0.10.0"
JOBSET_INSTALL_HINT = (
    "kubectl apply --server-side -f "
    "https://github.com/kubernetes-sigs/jobset/releases/download/v0.10.1/manifests.yaml (or newer)"
)


def _api_triplet(kind: str) -> tuple[str, str, str]:
    if kind == "JobSet":
        return JOBSET
    if kind == "Job":
        return JOB
    raise RecError(f"cannot submit kind {kind!r} (only JobSet and Job)")


class KubeClient:
    """A thin wrapper around the kubernetes client for the calls the pipeline needs."""

    def __init__(self, context: str = "", kubeconfig: str | None = None, credentials_hint: str = ""):
        try:
            from kubernetes import client, config  # noqa: PLC0415 (deployment-only dependency)
            from kubernetes.config.config_exception import ConfigException  # noqa: PLC0415
        except ImportError:  # pragma: no cover - depends on the environment
            raise RecError("submitting needs the kubernetes client: pip install 'rec[deploy]'") from None
        try:
            api = config.new_client_from_config(config_file=kubeconfig, context=context or None)
        except (ConfigException, FileNotFoundError, OSError, TypeError) as exc:
            where = kubeconfig or "~/.kube/config (or $KUBECONFIG)"
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RecError(
                f"no usable Kubernetes context {context or '(current)'} in {where} ({detail}); "
                f"fetch one with `{credentials_hint or 'gcloud container clusters get-credentials CLUSTER --location LOCATION --project PROJECT'}`, "
                "or only write and check manifests with `make render` and `make validate`"
            ) from None
        self._client_mod = client
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.extensions = client.ApiextensionsV1Api(api)
        self.context = context

    def _call(self, what: str, fn, *args, _not_found_ok: bool = False, **kwargs):
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and _not_found_ok:
                raise _NotFound() from None
            error = _api_error(what, exc)
            raise (TransientApiError(str(error)) if exc.status in TRANSIENT_HTTP else error) from None
        except OSError as exc:  # connection refused or reset, DNS, TLS
            raise TransientApiError(f"{what}: cannot reach the Kubernetes API ({exc})") from None
        except Exception as exc:  # urllib3 MaxRetryError and friends are not OSErrors
            if type(exc).__module__.startswith(("urllib3", "http.client")):
                raise TransientApiError(f"{what}: cannot reach the Kubernetes API ({type(exc).__name__})") from None
            raise

    def create(self, doc: dict) -> dict:
        group, version, plural = _api_triplet(doc["kind"])
        ns, name = doc["metadata"]["namespace"], doc["metadata"]["name"]
        return self._call(
            f"create {doc['kind']} {ns}/{name}",
            self.custom.create_namespaced_custom_object,
            group,
            version,
            ns,
            plural,
            doc,
            field_validation="Strict",  # unknown fields are refused, never pruned with a warning
        )

    def crd(self, name: str) -> dict | None:
        """The CustomResourceDefinition `name` as a dict (None if not installed)."""
        try:
            resp = self._call(
                f"read CustomResourceDefinition {name}",
                self.extensions.read_custom_resource_definition,
                name,
                _preload_content=False,
                _not_found_ok=True,
            )
        except _NotFound:
            return None
        data = resp.data if hasattr(resp, "data") else resp.read()
        return json.loads(data or b"{}")

    def get(self, kind: str, namespace: str, name: str) -> dict | None:

        group, version, plural = _api_triplet(kind)
        try:
            return self._call(
                f"get {kind} {namespace}/{name}",
                self.custom.get_namespaced_custom_object,
                group,
                version,
                namespace,
                plural,
                name,
                _not_found_ok=True,
            )
        except _NotFound:
            return None

    def pod_log(self, namespace: str, pod: str, container: str, tail_lines: int) -> str:
        resp = self._call(
            f"read log of pod {namespace}/{pod}",
            self.core.read_namespaced_pod_log,
            pod,
            namespace,
            container=container,
            tail_lines=tail_lines,
            _preload_content=False,
        )
        data = resp.data if hasattr(resp, "data") else resp.read()
        return data.decode("utf-8", errors="replace") if isinstance(data, bytes) else str(data)

    def pods(self, namespace: str, selector: str) -> list[dict]:
        resp = self._call(
            f"list pods {selector}",
            self.core.list_namespaced_pod,
            namespace,
            label_selector=selector,
            _preload_content=False,
        )
        data = resp.data if hasattr(resp, "data") else resp.read()
        return json.loads(data or b"{}").get("items") or []


class _NotFound(Exception):
    pass


class TransientApiError(RecError):
    """An API error that may pass by itself (connection reset, 429, 5xx): waiting retries it."""


def jobset_crd_problem(crd: dict | None) -> str:
    """'' if the installed JobSet CRD serves v1alpha2 with the failure-policy fields we render,
    else one line saying what to install (pure: unit-tested on the real CRD file)."""
    if crd is None:
        return f"the JobSet controller is not installed (no CRD {JOBSET_CRD}); install JobSet >= {MIN_JOBSET_VERSION}: {JOBSET_INSTALL_HINT}"
    versions = {v.get("name"): v for v in (crd.get("spec") or {}).get("versions") or []}
    schema = ((versions.get("v1alpha2") or {}).get("schema") or {}).get("openAPIV3Schema") or {}
    rule = schema
    for key in ("spec", "failurePolicy", "rules"):
        rule = ((rule.get("properties") or {}).get(key)) or {}
    fields = (rule.get("items") or {}).get("properties") or {}
    if "v1alpha2" not in versions:
        return f"the cluster's JobSet CRD does not serve jobset.x-k8s.io/v1alpha2; install JobSet >= {MIN_JOBSET_VERSION}: {JOBSET_INSTALL_HINT}"
    if "onJobFailureMessagePatterns" not in fields:
        return (
            f"the cluster's JobSet controller is older than {MIN_JOBSET_VERSION} (its CRD has no "
            "failurePolicy.rules[].onJobFailureMessagePatterns, so preemptions could not be told from "
            f"failures and every failure would restart without limit); upgrade: {JOBSET_INSTALL_HINT}"
        )
    return ""


def preflight(client: KubeClient, steps: list[Step]) -> None:
    """Refuse to create anything on a cluster whose JobSet controller cannot run our manifests. A
    user who may not read CRDs (RBAC) is told so; the Strict create still catches a pruned field."""
    if not any(step.kind == "JobSet" for step in steps):
        return
    try:
        crd = client.crd(JOBSET_CRD)
    except RecError as exc:
        if "HTTP 403" not in str(exc):
            raise
        print(f"note: cannot read CRD {JOBSET_CRD} ({exc}); JobSet version not checked", file=sys.stderr)
        return
    problem = jobset_crd_problem(crd)
    if problem:
        raise RecError(problem)


def _api_error(what: str, exc) -> RecError:
    message = exc.reason or ""
    try:
        body = json.loads(exc.body or "{}")
        message = body.get("message") or message
    except (TypeError, ValueError):
        pass
    hint = ""
    if exc.status == 404 and "create" in what:
        hint = " (is the JobSet controller installed? see docs/DEPLOY.md)"
    elif exc.status in (401, 403):
        hint = " (check `gcloud auth login` and your RBAC in this namespace)"
    return RecError(f"{what}: HTTP {exc.status}: {message}{hint}")


# ---------------------------------------------------------------------------------------------
# State


@dataclasses.dataclass
class State:
    phase: str  # NotFound | Pending | Running | Completed | Failed
    restarts: int = 0
    message: str = ""

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL


def _true_condition(obj: dict, *types: str) -> dict | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") in types and str(cond.get("status")) == "True":
            return cond
    return None


def state_of(kind: str, obj: dict | None) -> State:
    """The phase of a JobSet or Job from its status (pure: used by wait, status and tests)."""
    if obj is None:
        return State("NotFound")
    status = obj.get("status") or {}
    if kind == "JobSet":
        restarts = int(status.get("restarts") or 0)
        terminal = status.get("terminalState")
        failed = _true_condition(obj, "Failed")
        completed = _true_condition(obj, "Completed")
        if terminal == "Failed" or (not terminal and failed):
            return State(
                "Failed", restarts, (failed or {}).get("message") or (failed or {}).get("reason") or ""
            )
        if terminal == "Completed" or completed:
            return State("Completed", restarts, (completed or {}).get("message", ""))
        active = sum(
            int(r.get("active") or 0) + int(r.get("ready") or 0)
            for r in status.get("replicatedJobsStatus") or []
        )
        restarting = _true_condition(obj, "RestartingJobSet")
        message = "restarting" if restarting else ""
        return State("Running" if active else "Pending", restarts, message)
    failed = _true_condition(obj, "Failed")
    if failed:
        return State(
            "Failed", int(status.get("failed") or 0), failed.get("message") or failed.get("reason") or ""
        )
    if _true_condition(obj, "Complete", "SuccessCriteriaMet"):
        return State("Completed", int(status.get("failed") or 0))
    return State("Running" if status.get("active") else "Pending", int(status.get("failed") or 0))


def pod_summary(pods: list[dict]) -> str:
    """'4 Running' / '3 Running, 1 Pending' — what the progress line shows."""
    counts: dict[str, int] = {}
    for pod in pods:
        phase = (pod.get("status") or {}).get("phase") or "Unknown"
        counts[phase] = counts.get(phase, 0) + 1
    return ", ".join(f"{n} {phase}" for phase, n in sorted(counts.items())) or "no pods yet"


def pod_failures(pods: list[dict]) -> list[str]:
    """One line per failed container or stuck pod: exit code, reason and message."""
    out = []
    for pod in pods:
        name = (pod.get("metadata") or {}).get("name", "?")
        status = pod.get("status") or {}
        for cs in status.get("containerStatuses") or []:
            term = ((cs.get("state") or {}).get("terminated")) or (
                (cs.get("lastState") or {}).get("terminated")
            )
            if term and int(term.get("exitCode") or 0) != 0:
                detail = term.get("message") or ""
                out.append(
                    f"pod {name} container {cs.get('name')} exited {term.get('exitCode')} ({term.get('reason', '')})"
                    + (f": {detail.strip().splitlines()[-1]}" if detail.strip() else "")
                )
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in (
                "ImagePullBackOff",
                "ErrImagePull",
                "CreateContainerConfigError",
                "CrashLoopBackOff",
            ):
                out.append(
                    f"pod {name} container {cs.get('name')} {waiting['reason']}: {waiting.get('message', '')}"
                )
        if status.get("phase") == "Pending":
            for cond in status.get("conditions") or []:
                if (
                    cond.get("type") == "PodScheduled"
                    and cond.get("status") == "False"
                    and cond.get("message")
                ):
                    out.append(f"pod {name} unschedulable: {cond['message']}")
    return out


def selector_for(step: Step) -> str:
    return f"{POD_SELECTOR[step.kind]}={step.object_name}"


def logs_hint(step: Step, context: str = "", cluster: str = "", project: str = "") -> str:
    ctx = f" --context {context}" if context else ""
    cmd = (
        f"kubectl logs{ctx} -n {step.namespace} -l {selector_for(step)} --all-containers --prefix "
        f"--max-log-requests=8 --tail=200"
    )
    if cluster and project:
        query = (
            f'resource.type="k8s_container" AND resource.labels.cluster_name="{cluster}" '
            f'AND resource.labels.namespace_name="{step.namespace}" AND resource.labels.pod_name:"{step.object_name}-"'
        )
        cmd += f"; after the pods are gone: gcloud logging read '{query}' --project {project} --freshness=7d"
    return cmd


# ---------------------------------------------------------------------------------------------
# Waiting and sequencing


def parse_duration(text: str) -> float:
    """'90', '90s', '30m', '48h', '2d' -> seconds."""
    text = str(text).strip().lower()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            value = float(text[:-1]) * units[text[-1]]
        else:
            value = float(text)
    except ValueError:
        raise RecError(f"--timeout {text!r}: expected seconds or a duration like 30m, 48h") from None
    if value <= 0:
        raise RecError(f"--timeout {text!r}: must be positive")
    return value


def _fmt_duration(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def wait_for(
    client: KubeClient,
    step: Step,
    timeout: float,
    poll: float = 30.0,
    progress: bool = True,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    hint: str = "",
) -> State:
    """Poll until the object is Completed or Failed; a timeout raises (the object keeps running)."""
    from tqdm import tqdm  # noqa: PLC0415

    label = f"{step.kind} {step.namespace}/{step.object_name}"
    start = clock()
    bar = tqdm(
        total=None,
        desc=f"{step.name}: {label}",
        bar_format="{desc} [{elapsed}] {postfix}",
        file=sys.stderr,
        disable=not progress,
        dynamic_ncols=True,
    )
    last = ""
    failures = 0  # consecutive transient API errors
    try:
        while True:
            elapsed = clock() - start
            try:
                state, pods = _observe(client, step)
            except TransientApiError as exc:
                failures += 1
                if elapsed >= timeout:
                    raise RecError(f"{label}: gave up after {_fmt_duration(elapsed)} (timeout): {exc}") from None
                bar.set_postfix_str(f"API error {failures}x, retrying: {exc}", refresh=True)
                last = ""
                # Backoff from the poll interval up to 5 minutes: a 48-hour wait outlives API restarts.
                sleep(min(MAX_BACKOFF, poll * 2 ** min(failures - 1, 10), max(timeout - elapsed, 0.0)))
                continue
            failures = 0
            if state.terminal:
                return state
            line = f"{state.phase}; pods: {pod_summary(pods)}"
            if state.restarts:
                line += f"; restarts: {state.restarts}"
            if state.message:
                line += f"; {state.message}"
            trouble = pod_failures(pods)  # e.g. unschedulable (no TPU capacity), image pull errors
            if trouble:
                line += f"; {trouble[0]}"
            if line != last:
                bar.set_postfix_str(line, refresh=True)
                last = line
            if elapsed >= timeout:
                raise RecError(
                    f"{label}: still {state.phase} after {_fmt_duration(elapsed)} (timeout); it keeps running on the "
                    f"cluster: `make status` shows it, `make pipeline` resumes waiting{'; logs: ' + hint if hint else ''}"
                )
            sleep(min(poll, max(timeout - elapsed, 0.0)))
    finally:
        bar.close()


MAX_BACKOFF = 300.0


def _observe(client: KubeClient, step: Step) -> tuple[State, list[dict]]:
    label = f"{step.kind} {step.namespace}/{step.object_name}"
    state = state_of(step.kind, client.get(step.kind, step.namespace, step.object_name))
    if state.phase == "NotFound":
        raise RecError(f"{label} disappeared while waiting (deleted, or removed by its TTL)")
    if state.terminal:
        return state, []
    return state, client.pods(step.namespace, selector_for(step))


def outputs_pending(step: Step) -> str:
    """'' when the step's outputs are finished, else why not (rec.storage.outputs, through GCS)."""
    kind, path, split = step.outputs
    if not kind:
        return "no outputs declared"
    from rec.storage.outputs import not_done  # noqa: PLC0415 (needs the gcs extra)

    try:
        return not_done(kind, path, split)
    except ImportError:
        raise RecError(
            f"checking {path} needs google-cloud-storage: pip install 'rec[deploy]'"
        ) from None
    except RecError:
        raise
    except Exception as exc:  # google.auth / google.api_core errors: one line with the fix
        raise RecError(
            f"cannot read {path} to see whether step '{step.name}' is done ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); check `gcloud auth application-default login`"
        ) from None


def run_steps(
    client: KubeClient | None,
    steps: list[Step],
    timeouts: dict[str, float],
    poll: float = 30.0,
    dry_run: bool = False,
    progress: bool = True,
    out=print,
    log_hint: Callable[[Step], str] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    pending: Callable[[Step], str] = outputs_pending,
) -> None:
    """Skip each step whose outputs are done; else create its object (or adopt the one there),
    wait for it, check that it left its outputs, and stop at the first failure."""
    total = len(steps)
    for i, step in enumerate(steps, 1):
        label = f"{step.kind} {step.namespace}/{step.object_name}"
        where = f"[{i}/{total}] {step.name}"
        timeout = timeouts.get(step.name, timeouts.get("default", 48 * 3600))
        if dry_run:
            out(
                f"{where}: unless {step.outputs[1]} is done, would create {label} from "
                f"k8s/rendered/{step.file}, then wait up to {_fmt_duration(timeout)} for it to complete"
            )
            continue
        assert client is not None
        if not pending(step):
            out(f"{where}: outputs at {step.outputs[1]} are done; skipping")
            continue
        hint = log_hint(step) if log_hint else logs_hint(step, client.context)
        existing = client.get(step.kind, step.namespace, step.object_name)
        state = state_of(step.kind, existing)
        if state.phase in TERMINAL:
            advice = (
                f"it {'failed' if state.phase == 'Failed' else 'completed without its outputs'} in an earlier "
                f"attempt; delete it (kubectl delete {step.kind.lower()} -n {step.namespace} {step.object_name}) "
                "to run it again, or use a new RUN name"
            )
            _stop(step, label, state, client, hint, advice)
        if existing is None:
            client.create(step.doc)
            out(f"{where}: created {label}")
        else:
            out(f"{where}: {label} is already {state.phase}; waiting for it")
        state = wait_for(client, step, timeout, poll, progress=progress, clock=clock, sleep=sleep, hint=hint)
        if state.phase == "Failed":
            _stop(step, label, state, client, hint, "")
        missing = pending(step)
        if missing:
            _stop(step, label, State("Failed", state.restarts, f"completed, but {missing}"), client, hint, "")
        out(f"{where}: {label} completed" + (f" after {state.restarts} restart(s)" if state.restarts else ""))


def _stop(step: Step, label: str, state: State, client: KubeClient, hint: str, advice: str) -> None:
    pods = client.pods(step.namespace, selector_for(step))
    for line in pod_failures(pods):
        print(f"  {line}", file=sys.stderr)
    reason = state.message or "no reason given"
    first_pod = (pod_failures(pods) or [""])[0]
    detail = f"; {first_pod}" if first_pod else ""
    raise RecError(
        f"step '{step.name}' failed: {label} {state.phase} ({reason}){detail}"
        + (f"; restarts used: {state.restarts}" if state.restarts else "")
        + (f"; {advice}" if advice else "")
        + "; later steps were not started; logs: "
        + hint
    )


def status_lines(client: KubeClient, steps: list[Step]) -> list[str]:
    lines = []
    for step in steps:
        state = state_of(step.kind, client.get(step.kind, step.namespace, step.object_name))
        text = f"{step.name:7s} {step.kind:6s} {step.namespace}/{step.object_name}: "
        if state.phase == "NotFound":
            lines.append(text + "not submitted")
            continue
        pods = client.pods(step.namespace, selector_for(step))
        text += f"{state.phase}; pods: {pod_summary(pods)}"
        if state.restarts:
            text += f"; restarts: {state.restarts}"
        if state.message:
            text += f"; {state.message}"
        lines.append(text)
        lines += [f"        {line}" for line in pod_failures(pods)]
    return lines


def log_lines(client: KubeClient, step: Step, tail: int = 100) -> list[str]:
    """The last `tail` lines of each pod of a step, prefixed with the pod name (worker order)."""
    pods = client.pods(step.namespace, selector_for(step))
    if not pods:
        return [
            f"{step.kind} {step.namespace}/{step.object_name}: no pods (not started, or removed by the TTL; "
            "older logs are in Cloud Logging)"
        ]
    lines = []
    for pod in sorted(pods, key=lambda p: (p.get("metadata") or {}).get("name", "")):
        name = (pod.get("metadata") or {}).get("name", "?")
        for line in client.pod_log(step.namespace, name, "rec", tail).splitlines():
            lines.append(f"[{name}] {line}")
    return lines
