"""Submit, wait for and inspect JobSets and Jobs with the `kubernetes` Python client.

Only a handful of API calls are used (create/get of JobSets and Jobs, list pods), all through the
generic custom-objects path with plain dicts, so the client's typed models never re-interpret a
manifest. State comes from the objects' status:
  JobSet: status.terminalState (Completed | Failed), else the Completed/Failed conditions;
  Job:    the Complete/Failed conditions.
`run_steps` is the pipeline: each step is created (or found already there), waited for with
progress, and the first failure stops everything with the reason and the commands that show logs.
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
        self.context = context

    def _call(self, what: str, fn, *args, _not_found_ok: bool = False, **kwargs):
        from kubernetes.client.exceptions import ApiException  # noqa: PLC0415

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and _not_found_ok:
                raise _NotFound() from None
            raise _api_error(what, exc) from None
        except OSError as exc:  # connection refused, DNS, TLS
            raise RecError(f"{what}: cannot reach the Kubernetes API ({exc})") from None
        except Exception as exc:  # urllib3 MaxRetryError and friends are not OSErrors
            if type(exc).__module__.startswith("urllib3"):
                raise RecError(f"{what}: cannot reach the Kubernetes API ({type(exc).__name__})") from None
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
        )

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
    try:
        while True:
            state = state_of(step.kind, client.get(step.kind, step.namespace, step.object_name))
            if state.phase == "NotFound":
                raise RecError(f"{label} disappeared while waiting (deleted, or removed by its TTL)")
            if state.terminal:
                return state
            pods = client.pods(step.namespace, selector_for(step))
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
            elapsed = clock() - start
            if elapsed >= timeout:
                raise RecError(
                    f"{label}: still {state.phase} after {_fmt_duration(elapsed)} (timeout); it keeps running on the "
                    f"cluster: `make status` shows it, `make pipeline` resumes waiting{'; logs: ' + hint if hint else ''}"
                )
            sleep(min(poll, max(timeout - elapsed, 0.0)))
    finally:
        bar.close()


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
) -> None:
    """Create each step's object (or find it), wait for it, and stop at the first failure."""
    total = len(steps)
    for i, step in enumerate(steps, 1):
        label = f"{step.kind} {step.namespace}/{step.object_name}"
        timeout = timeouts.get(step.name, timeouts.get("default", 48 * 3600))
        if dry_run:
            out(
                f"[{i}/{total}] {step.name}: would create {label} from k8s/rendered/{step.file}, "
                f"then wait up to {_fmt_duration(timeout)} for it to complete"
            )
            continue
        assert client is not None
        hint = log_hint(step) if log_hint else logs_hint(step, client.context)
        existing = client.get(step.kind, step.namespace, step.object_name)
        state = state_of(step.kind, existing)
        if state.phase == "Completed":
            out(f"[{i}/{total}] {step.name}: {label} already completed; skipping")
            continue
        if state.phase == "Failed":
            _stop(
                step,
                label,
                state,
                client,
                hint,
                "it failed in an earlier attempt; delete it "
                f"(kubectl delete {step.kind.lower()} -n {step.namespace} {step.object_name}) or use a new RUN name",
            )
        if existing is None:
            client.create(step.doc)
            out(f"[{i}/{total}] {step.name}: created {label}")
        else:
            out(f"[{i}/{total}] {step.name}: {label} is already {state.phase}; waiting for it")
        state = wait_for(client, step, timeout, poll, progress=progress, clock=clock, sleep=sleep, hint=hint)
        if state.phase == "Failed":
            _stop(step, label, state, client, hint, "")
        out(
            f"[{i}/{total}] {step.name}: {label} completed"
            + (f" after {state.restarts} restart(s)" if state.restarts else "")
        )


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
