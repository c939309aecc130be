"""Offline validation of rendered manifests.

Three layers, each reporting `<file>: <Kind>/<name>: [<rule>] <message>` lines:
  1. schema: every JobSet against the JobSet CRD's openAPIV3Schema made strict (unknown fields are
     errors, as `kubectl --validate=strict` would say), when ../shared/k8s/ has the CRD;
  2. batch/v1: every Job, and every JobSet's embedded Job template wrapped as a Job, with
     kubernetes-validate in strict mode;
  3. GKE TPU rules (`GKE_RULES`): what neither schema knows (chips x hosts = topology, selectors,
     names short enough for the generated pod names, env, GCS FUSE + hostNetwork, restarts, TTL...).
Each rule is a pure function of one object, so a test can break a manifest and watch the rule fire.
"""

from __future__ import annotations

import functools
import math
import pathlib
import re
from collections.abc import Callable

from rec.errors import FAIL_FAST_EXIT_CODES, RecError
from tools.deploy.values import ROLLOUT_VARS, ROOT, check_image, read_text

CRD_DIR = ROOT.parent / "shared" / "k8s"
CRD_PATH = CRD_DIR / "jobset.x-k8s.io_jobsets.yaml"
# The Argo CRDs the Workflow and the Application are checked against (full schemas), when present.
ARGO_CRDS = {
    "Workflow": (CRD_DIR / "argoproj.io_workflows.yaml", "workflows.argoproj.io", "v1alpha1"),
    "Application": (CRD_DIR / "argoproj.io_applications.yaml", "applications.argoproj.io", "v1alpha1"),
}
K8S_VERSION = "1.33"  # GKE minor the Job schema is checked against

TPU_RESOURCE = "google.com/tpu"
ACCELERATOR_LABEL = "cloud.google.com/gke-tpu-accelerator"
TOPOLOGY_LABEL = "cloud.google.com/gke-tpu-topology"
INSTANCE_LABEL = "node.kubernetes.io/instance-type"
EXCLUSIVE_ANNOTATION = "alpha.jobset.sigs.k8s.io/exclusive-topology"
FUSE_DRIVER = "gcsfuse.csi.storage.gke.io"
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RULE_NAME = re.compile(r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
MIN_TTL_SECONDS = 3600
MAX_RESTARTS_LIMIT = 10
# Training stages: their pods must checkpoint to gs:// and restart a bounded number of times.
TRAINING_COMPONENTS = ("sft", "rl", "grpo")


# ---------------------------------------------------------------------------------------------
# Layer 1: the JobSet CRD schema, strict


def _make_strict(schema):
    """Add additionalProperties: false to every object schema that lists its properties."""
    if isinstance(schema, dict):
        out = {k: _make_strict(v) for k, v in schema.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in out
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_make_strict(v) for v in schema]
    return schema


def _get(obj, *keys):
    """obj[k1][k2]... or None where a level is missing or not a mapping."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


JOBSET_CRD_NAME = "jobsets.jobset.x-k8s.io"
JOBSET_VERSION = "v1alpha2"


@functools.lru_cache(maxsize=8)
def crd_validator(crd_path: str, crd_name: str = JOBSET_CRD_NAME, version: str = JOBSET_VERSION):
    """Strict validator of the CRD at `crd_path` (default: the JobSet CRD); a file that is missing,
    unreadable, not YAML or not that CRD (with a `version` openAPIV3Schema) is a one-line RecError."""
    import jsonschema  # noqa: PLC0415 (deployment-only dependency)
    import yaml  # noqa: PLC0415

    path = pathlib.Path(crd_path)
    if not path.is_file():
        raise RecError(f"{crd_path}: JobSet CRD file not found")
    text = read_text(path, crd_path)
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:
        crd = yaml.load(text, Loader=loader)  # noqa: S506 (a safe loader)
    except yaml.YAMLError as exc:
        raise RecError(f"{crd_path}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    what = f"{crd_path}: not the {'JobSet' if crd_name == JOBSET_CRD_NAME else crd_name} CRD"
    if not isinstance(crd, dict) or crd.get("kind") != "CustomResourceDefinition":
        found = crd.get("kind") if isinstance(crd, dict) else type(crd).__name__
        raise RecError(f"{what} (expected kind: CustomResourceDefinition, found {found!r})")
    name = _get(crd, "metadata", "name")
    if name != crd_name:
        raise RecError(f"{what} (metadata.name is {name!r}, expected {crd_name!r})")
    versions = _get(crd, "spec", "versions")
    if not isinstance(versions, list):
        raise RecError(f"{what}: spec.versions is missing")
    by_name = {v.get("name"): v for v in versions if isinstance(v, dict)}
    schema = _get(by_name, version, "schema", "openAPIV3Schema")
    if not isinstance(schema, dict):
        raise RecError(
            f"{what}: no spec.versions[{version}].schema.openAPIV3Schema "
            f"(versions: {', '.join(map(str, by_name)) or 'none'})"
        )
    return jsonschema.Draft7Validator(_make_strict(schema))


def _path(error) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(top level)"


def check_crd_schema(doc: dict, crd_path: pathlib.Path | None = CRD_PATH) -> list[str]:
    if crd_path is None or not pathlib.Path(crd_path).is_file():
        return []
    validator = crd_validator(str(crd_path))
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"[jobset-crd] {_path(e)}: {e.message}" for e in errors[:5]]


def check_argo_schema(doc: dict, kind: str) -> list[str]:
    """The Workflow or Application against its full Argo CRD schema, strict (skipped without it)."""
    path, name, version = ARGO_CRDS[kind]
    if not path.is_file():
        return []
    validator = crd_validator(str(path), name, version)
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    return [f"[{kind.lower()}-crd] {_path(e)}: {e.message}" for e in errors[:5]]


# ---------------------------------------------------------------------------------------------
# Layer 2: batch/v1 Jobs with kubernetes-validate


def embedded_jobs(doc: dict) -> list[tuple[str, dict]]:
    """(label, batch/v1 Job) for a Job, or for each replicatedJob template of a JobSet."""
    if doc.get("kind") == "Job":
        return [("", doc)]
    jobs = []
    for rj in (doc.get("spec") or {}).get("replicatedJobs") or []:
        template = rj.get("template") or {}
        job = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {
                "name": f"{doc.get('metadata', {}).get('name', 'jobset')}-{rj.get('name', 'job')}-0",
                **(
                    {"labels": template["metadata"]["labels"]}
                    if template.get("metadata", {}).get("labels")
                    else {}
                ),
            },
            "spec": template.get("spec") or {},
        }
        jobs.append((f"replicatedJobs[{rj.get('name')}].template", job))
    return jobs


def check_batch_job(doc: dict) -> list[str]:
    import kubernetes_validate  # noqa: PLC0415 (deployment-only dependency)

    problems = []
    for label, job in embedded_jobs(doc):
        try:
            kubernetes_validate.validate(job, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in getattr(exc, "path", [])) or "(top level)"
            prefix = f"{label}: " if label else ""
            problems.append(f"[batch-v1] {prefix}{where}: {exc.message}")
    return problems


def check_builtin(doc: dict) -> list[str]:
    """Any other built-in kind (the cluster setup file), strict."""
    import kubernetes_validate  # noqa: PLC0415

    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in getattr(exc, "path", [])) or "(top level)"
        return [f"[k8s-schema] {where}: {exc.message}"]
    return []


# ---------------------------------------------------------------------------------------------
# Layer 3: GKE TPU rules. Each takes one object and returns messages (empty = fine).


def _pod_templates(doc: dict) -> list[tuple[dict, dict, dict]]:
    """(replicatedJob or {}, job spec, pod template) for a JobSet or Job."""
    if doc.get("kind") == "Job":
        spec = doc.get("spec") or {}
        return [({}, spec, spec.get("template") or {})]
    out = []
    for rj in (doc.get("spec") or {}).get("replicatedJobs") or []:
        spec = (rj.get("template") or {}).get("spec") or {}
        out.append((rj, spec, spec.get("template") or {}))
    return out


def _containers(pod: dict) -> list[dict]:
    return ((pod.get("spec") or {}).get("containers")) or []


def containers(doc: dict) -> list[dict]:
    """Every container of a JobSet's or Job's pod templates."""
    return [c for _, _, pod in _pod_templates(doc) for c in _containers(pod) if isinstance(c, dict)]


def _tpu_chips(container: dict) -> tuple[int | None, int | None]:
    res = container.get("resources") or {}

    def get(kind):
        value = (res.get(kind) or {}).get(TPU_RESOURCE)
        try:
            return None if value is None else int(value)
        except (TypeError, ValueError):
            return -1

    return get("limits"), get("requests")


def _is_tpu(doc: dict) -> bool:
    return any(
        _tpu_chips(c)[0] is not None or _tpu_chips(c)[1] is not None
        for _, _, pod in _pod_templates(doc)
        for c in _containers(pod)
    )


def _component(doc: dict) -> str:
    return ((doc.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component", "")


def _env(container: dict) -> dict[str, dict]:
    return {e.get("name"): e for e in container.get("env") or []}


def _topology_chips(topology: str) -> int | None:
    try:
        return math.prod(int(x) for x in topology.split("x"))
    except (ValueError, AttributeError):
        return None


def rule_tpu_topology(doc: dict) -> list[str]:
    """Chips per host x hosts must equal the topology's chip count (4x4 = 4 x 4, 2x4 = 1 x 8)."""
    out = []
    for _, spec, pod in _pod_templates(doc):
        selector = (pod.get("spec") or {}).get("nodeSelector") or {}
        topology = selector.get(TOPOLOGY_LABEL)
        for c in _containers(pod):
            limits, requests = _tpu_chips(c)
            if limits is None and requests is None:
                continue
            if requests is not None and limits is not None and requests != limits:
                out.append(
                    f"container {c.get('name')}: {TPU_RESOURCE} requests {requests} != limits {limits}"
                )
            chips = limits if limits is not None else requests
            if chips not in (1, 4, 8):
                out.append(
                    f"container {c.get('name')}: {TPU_RESOURCE} = {chips}; a v6e host has 1, 4 or 8 chips (request all of them)"
                )
            hosts = spec.get("parallelism", 1)
            total = _topology_chips(topology) if topology else None
            if total is None:
                out.append(f"nodeSelector {TOPOLOGY_LABEL} = {topology!r}: not a topology like 4x4")
            elif chips * hosts != total:
                out.append(
                    f"{hosts} host(s) x {chips} chips = {chips * hosts}, but topology {topology} has {total} chips"
                )
            if chips == 8 and selector.get(INSTANCE_LABEL) != "ct6e-standard-8t":
                out.append(
                    f"8 chips per host needs nodeSelector {INSTANCE_LABEL}: ct6e-standard-8t "
                    "(a 2-VM ct6e-standard-4t pool is also labelled 2x4)"
                )
    return out


def rule_tpu_selectors(doc: dict) -> list[str]:
    """TPU pods select the v6e accelerator and a topology, and tolerate the google.com/tpu taint."""
    if not _is_tpu(doc):
        return []
    out = []
    for _, _, pod in _pod_templates(doc):
        spec = pod.get("spec") or {}
        selector = spec.get("nodeSelector") or {}
        if selector.get(ACCELERATOR_LABEL) != "tpu-v6e-slice":
            out.append(
                f"nodeSelector {ACCELERATOR_LABEL} must be tpu-v6e-slice, got {selector.get(ACCELERATOR_LABEL)!r}"
            )
        if not selector.get(TOPOLOGY_LABEL):
            out.append(f"nodeSelector {TOPOLOGY_LABEL} is missing")
        tolerations = spec.get("tolerations") or []
        if not any(t.get("key") == TPU_RESOURCE and t.get("operator") == "Exists" for t in tolerations):
            out.append(f"no toleration for the {TPU_RESOURCE} taint (key: {TPU_RESOURCE}, operator: Exists)")
    return out


def rule_slice_job(doc: dict) -> list[str]:
    """A slice Job: parallelism = completions, Indexed, backoffLimit 0, restartPolicy Never, one replica."""
    if doc.get("kind") != "JobSet" or not _is_tpu(doc):
        return []
    out = []
    for rj, spec, pod in _pod_templates(doc):
        if spec.get("parallelism", 1) != spec.get("completions", 1):
            out.append(
                f"replicatedJob {rj.get('name')}: parallelism {spec.get('parallelism')} != completions {spec.get('completions')}"
            )
        if spec.get("completionMode", "Indexed") != "Indexed":
            out.append(
                f"replicatedJob {rj.get('name')}: completionMode must be Indexed (TPU_WORKER_ID injection needs it)"
            )
        if spec.get("backoffLimit") != 0:
            out.append(
                f"replicatedJob {rj.get('name')}: backoffLimit must be 0 (SPMD cannot continue with a host missing)"
            )
        if (pod.get("spec") or {}).get("restartPolicy") != "Never":
            out.append(
                f"replicatedJob {rj.get('name')}: restartPolicy must be Never (OnFailure hides failures from the JobSet)"
            )
        if rj.get("replicas", 1) != 1:
            out.append(f"replicatedJob {rj.get('name')}: replicas must be 1 (one slice)")
    return out


def rule_host_network(doc: dict) -> list[str]:
    """hostNetwork needs dnsPolicy ClusterFirstWithHostNet, or peers' hostnames do not resolve."""
    out = []
    for _, _, pod in _pod_templates(doc):
        spec = pod.get("spec") or {}
        if spec.get("hostNetwork") and spec.get("dnsPolicy") != "ClusterFirstWithHostNet":
            out.append(
                f"hostNetwork: true needs dnsPolicy: ClusterFirstWithHostNet, got {spec.get('dnsPolicy')!r}"
            )
    return out


def rule_exclusive_placement(doc: dict) -> list[str]:
    """Multi-host JobSets carry the exclusive-topology annotation (one child Job per node pool);
    single-pod ones do not (JobSet's webhook would make them exclusive across the whole pool)."""
    if doc.get("kind") != "JobSet" or not _is_tpu(doc):
        return []
    annotations = (doc.get("metadata") or {}).get("annotations") or {}
    out = []
    for rj, spec, _ in _pod_templates(doc):
        rj_annotations = ((rj.get("template") or {}).get("metadata") or {}).get("annotations") or {}
        value = annotations.get(EXCLUSIVE_ANNOTATION) or rj_annotations.get(EXCLUSIVE_ANNOTATION)
        if spec.get("parallelism", 1) > 1 and value != "cloud.google.com/gke-nodepool":
            out.append(
                f"multi-host replicatedJob {rj.get('name')} needs annotation {EXCLUSIVE_ANNOTATION}: cloud.google.com/gke-nodepool"
            )
        elif spec.get("parallelism", 1) == 1 and value:
            out.append(
                f"single-pod replicatedJob {rj.get('name')}: drop annotation {EXCLUSIVE_ANNOTATION} (it would let "
                "only one such JobSet run per node pool at a time)"
            )
    return out


NODE_IDENTITY_ANNOTATION = "rec/gcs-identity"


def _gcs_paths(container: dict) -> list[str]:
    texts = [str(a) for key in ("command", "args") for a in container.get(key) or []]
    texts += [str(e.get("value", "")) for e in container.get("env") or [] if isinstance(e, dict)]
    return [t for t in texts if "gs://" in t]


def rule_host_network_identity(doc: dict) -> list[str]:
    """A hostNetwork pod's own GCS calls get the node's service account, not Workload Identity:
    refuse gs:// paths there unless the pod says the node's account is granted on purpose."""
    out = []
    for _, _, pod in _pod_templates(doc):
        if not (pod.get("spec") or {}).get("hostNetwork"):
            continue
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        if annotations.get(NODE_IDENTITY_ANNOTATION) == "node-service-account":
            continue
        for c in _containers(pod):
            paths = _gcs_paths(c)
            if paths:
                out.append(
                    f"container {c.get('name')}: hostNetwork with {paths[0]!r}: its GCS calls would run as the "
                    "node's service account, not the pod's (Workload Identity does not apply); turn hostNetwork "
                    f"off, or grant the node's account and annotate the pod {NODE_IDENTITY_ANNOTATION}: "
                    "node-service-account (values: tpu_host_network_node_identity)"
                )
    return out


def rule_exit_codes(doc: dict) -> list[str]:
    """Slice Jobs fail at once on exactly the exit codes a restart cannot fix (rec.errors)."""
    if doc.get("kind") != "JobSet" or not _is_tpu(doc):
        return []
    want = sorted(FAIL_FAST_EXIT_CODES)
    out = []
    for rj, spec, _ in _pod_templates(doc):
        rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
        codes = sorted(
            int(v)
            for r in rules
            if r.get("action") == "FailJob"
            and (r.get("onExitCodes") or {}).get("operator") == "In"
            and (r.get("onExitCodes") or {}).get("containerName") == "rec"
            for v in (r.get("onExitCodes") or {}).get("values") or []
        )
        if codes != want:
            out.append(
                f"replicatedJob {rj.get('name')}: podFailurePolicy must FailJob on exit codes {want} "
                f"(rec.errors.FAIL_FAST_EXIT_CODES), got {codes}"
            )
    return out


def rule_names(doc: dict) -> list[str]:
    """JobSet names are DNS-1035 and short enough for the names JobSet generates (<= 63 characters)."""
    name = (doc.get("metadata") or {}).get("name") or ""
    if doc.get("kind") not in ("JobSet", "Job"):
        return []
    out = []
    if not _DNS1035.match(name):
        out.append(f"name {name!r} is not DNS-1035 (lowercase letters, digits, '-', starting with a letter)")
    if doc.get("kind") == "Job":
        if len(name) > 63 - 6:  # pod name = <job>-<5 random>
            out.append(f"name {name!r} is too long: the pod names <job>-xxxxx would exceed 63 characters")
        return out
    for rj, spec, _ in _pod_templates(doc):
        rj_name = rj.get("name", "")
        job = f"{name}-{rj_name}-{rj.get('replicas', 1) - 1}"
        pod = f"{job}-{spec.get('parallelism', 1) - 1}-xxxxx"
        if len(job) > 63:
            out.append(f"generated Job name {job!r} has {len(job)} characters (> 63)")
        if len(pod) > 63:
            out.append(
                f"generated pod name {pod!r} has {len(pod)} characters (> 63); shorten the JobSet name "
                f"to at most {63 - (len(pod) - len(name))} characters"
            )
    return out


def rule_env(doc: dict) -> list[str]:
    """TPU pods run with JAX_PLATFORMS=tpu, helper Jobs with JAX_PLATFORMS=cpu; W&B key is optional;
    GRPO pods carry both rollout fast-path switches."""
    out = []
    tpu = _is_tpu(doc)
    for _, _, pod in _pod_templates(doc):
        for c in _containers(pod):
            env = _env(c)
            want = "tpu" if tpu else "cpu"
            got = (env.get("JAX_PLATFORMS") or {}).get("value")
            if got != want:
                out.append(f"container {c.get('name')}: env JAX_PLATFORMS must be {want!r}, got {got!r}")
            wandb = env.get("WANDB_API_KEY")
            if wandb is not None:
                ref = ((wandb.get("valueFrom") or {}).get("secretKeyRef")) or {}
                if "value" in wandb:
                    out.append(
                        f"container {c.get('name')}: WANDB_API_KEY must come from a Secret, not a literal value"
                    )
                elif ref.get("optional") is not True:
                    out.append(
                        f"container {c.get('name')}: WANDB_API_KEY secretKeyRef must be optional: true"
                    )
            if _component(doc) == "grpo":
                for var in ROLLOUT_VARS:
                    value = (env.get(var) or {}).get("value")
                    if value not in ("0", "1"):
                        out.append(
                            f'container {c.get("name")}: GRPO needs env {var} = "1" (or "0"), got {value!r}'
                        )
    return out


def rule_gcsfuse(doc: dict) -> list[str]:
    """A GCS FUSE volume needs the pod annotation, unlimited sidecar limits, and with hostNetwork
    the hostNetworkPodKSA attribute (else Workload Identity does not apply)."""
    out = []
    for _, _, pod in _pod_templates(doc):
        spec = pod.get("spec") or {}
        annotations = (pod.get("metadata") or {}).get("annotations") or {}
        fuse = [v for v in spec.get("volumes") or [] if (v.get("csi") or {}).get("driver") == FUSE_DRIVER]
        if not fuse:
            continue
        if annotations.get("gke-gcsfuse/volumes") != "true":
            out.append('GCS FUSE volume without the pod template annotation gke-gcsfuse/volumes: "true"')
        for key in (
            "gke-gcsfuse/cpu-limit",
            "gke-gcsfuse/memory-limit",
            "gke-gcsfuse/ephemeral-storage-limit",
        ):
            if annotations.get(key) != "0":
                out.append(
                    f'pod annotation {key} should be "0" (unlimited): an OOM-killed sidecar takes the mount down'
                )
        for v in fuse:
            attrs = (v.get("csi") or {}).get("volumeAttributes") or {}
            if not attrs.get("bucketName"):
                out.append(f"GCS FUSE volume {v.get('name')}: volumeAttributes.bucketName is missing")
            if spec.get("hostNetwork") and attrs.get("hostNetworkPodKSA") != "true":
                out.append(
                    f'GCS FUSE volume {v.get("name")} in a hostNetwork pod needs volumeAttributes.hostNetworkPodKSA: "true"'
                )
    return out


def rule_failure_policy(doc: dict) -> list[str]:
    """Training JobSets restart a bounded number of times (they resume from their checkpoint)."""
    if doc.get("kind") != "JobSet":
        return []
    policy = (doc.get("spec") or {}).get("failurePolicy") or {}
    out = []
    for rule in policy.get("rules") or []:
        if not _RULE_NAME.match(str(rule.get("name", ""))):
            out.append(f"failurePolicy rule name {rule.get('name')!r} must match {_RULE_NAME.pattern}")
    if _component(doc) in TRAINING_COMPONENTS:
        restarts = policy.get("maxRestarts")
        if not isinstance(restarts, int) or not 1 <= restarts <= MAX_RESTARTS_LIMIT:
            out.append(
                f"failurePolicy.maxRestarts must be 1..{MAX_RESTARTS_LIMIT} for a training JobSet, got {restarts!r}"
            )
    return out


def rule_ttl(doc: dict) -> list[str]:
    """Finished objects stay long enough to read their logs."""
    if doc.get("kind") not in ("JobSet", "Job"):
        return []
    ttl = (doc.get("spec") or {}).get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or ttl < MIN_TTL_SECONDS:
        return [
            f"spec.ttlSecondsAfterFinished must be >= {MIN_TTL_SECONDS} s (logs vanish with the pods), got {ttl!r}"
        ]
    return []


def rule_identity(doc: dict) -> list[str]:
    """Pods use a named Kubernetes service account (Workload Identity grants it the bucket)."""
    out = []
    for _, _, pod in _pod_templates(doc):
        sa = (pod.get("spec") or {}).get("serviceAccountName")
        if not sa or sa == "default":
            out.append(f"serviceAccountName must name the Workload Identity service account, got {sa!r}")
    return out


def rule_checkpoints_gcs(doc: dict) -> list[str]:
    """Training writes its run directory (checkpoints) to gs://, reachable from every host."""
    if _component(doc) not in TRAINING_COMPONENTS:
        return []
    out = []
    for _, _, pod in _pod_templates(doc):
        for c in _containers(pod):
            run_dirs = [a.split("=", 1)[1] for a in c.get("args") or [] if str(a).startswith("run.dir=")]
            if not run_dirs:
                out.append(f"container {c.get('name')}: no run.dir=gs://... argument")
            elif not all(d.startswith("gs://") for d in run_dirs):
                out.append(
                    f"container {c.get('name')}: run.dir must be a gs:// prefix (every host writes checkpoints), got {run_dirs[0]!r}"
                )
    return out


def rule_shm(doc: dict) -> list[str]:
    """TPU pods mount a memory-backed /dev/shm (the container default is 64 MB)."""
    if not _is_tpu(doc):
        return []
    out = []
    for _, _, pod in _pod_templates(doc):
        volumes = {v.get("name"): v for v in (pod.get("spec") or {}).get("volumes") or []}
        for c in _containers(pod):
            mounts = [m for m in c.get("volumeMounts") or [] if m.get("mountPath") == "/dev/shm"]
            if (
                not mounts
                or ((volumes.get(mounts[0].get("name")) or {}).get("emptyDir") or {}).get("medium")
                != "Memory"
            ):
                out.append(f"container {c.get('name')}: mount an emptyDir with medium: Memory at /dev/shm")
    return out


def rule_image(doc: dict) -> list[str]:
    """Images are pinned by tag or digest (never :latest)."""
    out = []
    for _, _, pod in _pod_templates(doc):
        for c in _containers(pod):
            try:
                check_image(c.get("image"), f"container {c.get('name')} image")
            except Exception as exc:  # RecError: reuse its message
                out.append(str(exc))
    return out


def rule_verified_handoff(doc: dict) -> list[str]:
    """Eval runs `rec handoff verify` on the handoff prefix before loading it, and loads only that prefix."""
    if _component(doc) != "eval":
        return []
    out = []
    for _, _, pod in _pod_templates(doc):
        for c in _containers(pod):
            script = " ".join(map(str, c.get("args") or []))
            handoff = (_env(c).get("REC_HANDOFF") or {}).get("value", "")
            verify = script.find('rec handoff verify "$REC_HANDOFF"')
            evaluate = script.find("rec eval")
            if not handoff.startswith("gs://"):
                out.append(
                    f"container {c.get('name')}: env REC_HANDOFF must be the gs:// handoff prefix, got {handoff!r}"
                )
            if verify < 0 or evaluate < 0 or verify > evaluate or '"model.path=$REC_HANDOFF"' not in script:
                out.append(
                    f'container {c.get("name")}: must run `rec handoff verify "$REC_HANDOFF"` (failing on error) '
                    "before `rec eval ... model.path=$REC_HANDOFF`"
                )
            elif "&&" not in script[verify:evaluate] and "set -e" not in script[:verify]:
                out.append(
                    f"container {c.get('name')}: a failed `rec handoff verify` must stop the script (set -e or &&)"
                )
    return out


def rule_upload_job(doc: dict) -> list[str]:
    """The upload Job publishes a run to a handoff on CPU: no TPU, `rec handoff publish`."""
    if _component(doc) != "upload":
        return []
    out = []
    if _is_tpu(doc):
        out.append(f"the upload Job must not request {TPU_RESOURCE}")
    for _, _, pod in _pod_templates(doc):
        if (pod.get("spec") or {}).get("restartPolicy") != "Never":
            out.append("restartPolicy must be Never")
        for c in _containers(pod):
            args = list(map(str, c.get("args") or []))
            if args[:3] != ["rec", "handoff", "publish"]:
                out.append(
                    f"container {c.get('name')}: args must start with rec handoff publish, got {args[:3]}"
                )
    return out


def _expected_input(doc: dict) -> tuple[str, str] | None:
    """(kind, path) a step must wait for before it starts: RL its SFT run, the upload its RL run,
    eval its handoff; None for the first steps."""
    component = _component(doc)
    for c in containers(doc):
        args = [str(a) for a in c.get("args") or []]
        if component == "rl":
            paths = [a.split("=", 1)[1] for a in args if a.startswith("model.path=")]
            return ("run", paths[0]) if paths else None
        if component == "upload" and "--run" in args[:-1]:
            return "run", args[args.index("--run") + 1]
        if component == "eval":
            return "handoff", str((_env(c).get("REC_HANDOFF") or {}).get("value", ""))
    return None


def rule_waits_for_input(doc: dict) -> list[str]:
    """Applied all at once with kubectl apply, a step must not start before its input is finished:
    an init container runs `rec outputs wait <kind> <its input>` first."""
    expected = _expected_input(doc)
    if expected is None or not expected[1].startswith("gs://"):
        return []
    out = []
    for _, _, pod in _pod_templates(doc):
        inits = (pod.get("spec") or {}).get("initContainers") or []
        waits = [
            [str(a) for a in c.get("args") or []] for c in inits if isinstance(c, dict)
        ]
        if not any(w[:5] == ["rec", "outputs", "wait", *expected] for w in waits):
            out.append(
                f"no init container runs `rec outputs wait {expected[0]} {expected[1]}`: applied beside the step "
                "before it, this one would start from an unfinished input"
            )
    return out


GKE_RULES: dict[str, Callable[[dict], list[str]]] = {
    "tpu-topology": rule_tpu_topology,
    "tpu-selectors": rule_tpu_selectors,
    "slice-job": rule_slice_job,
    "host-network-dns": rule_host_network,
    "exclusive-placement": rule_exclusive_placement,
    "host-network-identity": rule_host_network_identity,
    "exit-codes": rule_exit_codes,
    "name-length": rule_names,
    "env": rule_env,
    "gcsfuse": rule_gcsfuse,
    "failure-policy": rule_failure_policy,
    "ttl": rule_ttl,
    "workload-identity": rule_identity,
    "checkpoints-gcs": rule_checkpoints_gcs,
    "shm": rule_shm,
    "image": rule_image,
    "verified-handoff": rule_verified_handoff,
    "upload-job": rule_upload_job,
    "waits-for-input": rule_waits_for_input,
}


def check_gke_rules(doc: dict) -> list[str]:
    return [f"[{name}] {msg}" for name, rule in GKE_RULES.items() for msg in rule(doc)]


# ---------------------------------------------------------------------------------------------
# Argo objects


def check_workflow(doc: dict, crd_path: pathlib.Path | None = CRD_PATH) -> tuple[list[str], list[dict]]:
    """DAG structure and conditions; returns (problems, embedded manifests) for the caller to check."""
    import yaml  # noqa: PLC0415

    out: list[str] = []
    manifests: list[dict] = []
    spec = doc.get("spec") or {}
    templates = {t.get("name"): t for t in spec.get("templates") or []}
    entry = templates.get(spec.get("entrypoint"))
    if entry is None or "dag" not in entry:
        return [f"[workflow] entrypoint {spec.get('entrypoint')!r} is not a DAG template"], []
    tasks = entry["dag"].get("tasks") or []
    names = {t.get("name") for t in tasks}
    for task in tasks:
        if task.get("template") not in templates:
            out.append(f"[workflow] task {task.get('name')!r} uses unknown template {task.get('template')!r}")
        depends = task.get("depends")
        if depends:
            for ref in re.findall(r"([A-Za-z0-9-]+)\.(?:Succeeded|Failed|Errored|Skipped|Daemoned)", depends):
                if ref not in names:
                    out.append(f"[workflow] task {task.get('name')!r} depends on unknown task {ref!r}")
    for task in tasks:
        resource = (templates.get(task.get("template")) or {}).get("resource")
        if resource is None:
            continue
        template = templates.get(task.get("template")) or {}
        if resource.get("action") != "apply":
            out.append(
                f"[workflow] template {task.get('template')!r}: action must be apply (create fails on "
                "AlreadyExists when a step is retried or the object was created by the CLI)"
            )
        policy = (template.get("retryStrategy") or {}).get("retryPolicy")
        if policy not in ("OnError", "OnTransientError"):
            out.append(
                f"[workflow] template {task.get('template')!r}: needs retryStrategy.retryPolicy OnError "
                f"(an evicted executor must not orphan the object; a failed step must not be re-run), got {policy!r}"
            )
        done = f"{task.get('name')}-done"
        if done not in names or f"tasks.{done}.outputs.result" not in str(task.get("when", "")):
            out.append(
                f"[workflow] task {task.get('name')!r}: must run only `when` task {done!r} (rec outputs check) "
                "did not print done, or a rerun repeats finished steps"
            )
        if not resource.get("successCondition") or not resource.get("failureCondition"):
            out.append(
                f"[workflow] template {task.get('template')!r}: needs successCondition and failureCondition"
            )
        try:
            manifest = yaml.safe_load(resource.get("manifest") or "")
        except yaml.YAMLError as exc:
            out.append(f"[workflow] template {task.get('template')!r}: manifest is not YAML ({exc})")
            continue
        if not isinstance(manifest, dict):
            out.append(f"[workflow] template {task.get('template')!r}: manifest is not an object")
            continue
        if manifest.get("kind") == "JobSet" and "terminalState" not in resource.get("successCondition", ""):
            out.append(
                f"[workflow] template {task.get('template')!r}: JobSet success must test status.terminalState"
            )
        manifests.append(manifest)
    return out, manifests


def check_application(doc: dict) -> list[str]:
    """Argo CD must not re-run finished training: no selfHeal, no prune, only Workflows synced."""
    out = []
    spec = doc.get("spec") or {}
    automated = ((spec.get("syncPolicy") or {}).get("automated")) or {}
    if automated.get("selfHeal"):
        out.append("[argocd] syncPolicy.automated.selfHeal would re-create a finished run deleted by its TTL")
    if automated.get("prune"):
        out.append(
            "[argocd] syncPolicy.automated.prune would delete finished runs (and their logs) when files change"
        )
    include = ((spec.get("source") or {}).get("directory") or {}).get("include", "")
    if "workflow" not in include:
        out.append(
            "[argocd] source.directory.include should select only */workflow.yaml (JobSets are immutable and run once)"
        )
    return out


def object_label(doc: dict) -> str:
    return f"{doc.get('kind', '?')}/{(doc.get('metadata') or {}).get('name', '?')}"


def check_document(doc: dict, crd_path: pathlib.Path | None = CRD_PATH) -> list[str]:
    """Every problem of one object (schema, batch/v1, rules, embedded manifests)."""
    if not isinstance(doc, dict):
        return ["[yaml] document is not a mapping"]
    kind = doc.get("kind")
    problems: list[str] = []
    if kind == "JobSet":
        if doc.get("apiVersion") != "jobset.x-k8s.io/v1alpha2":
            problems.append(
                f"[api-version] JobSet apiVersion must be jobset.x-k8s.io/v1alpha2, got {doc.get('apiVersion')!r}"
            )
        problems += check_crd_schema(doc, crd_path)
        problems += check_batch_job(doc)
        problems += check_gke_rules(doc)
    elif kind == "Job":
        problems += check_batch_job(doc)
        problems += check_gke_rules(doc)
    elif kind == "Workflow":
        problems += check_argo_schema(doc, "Workflow")
        wf_problems, manifests = check_workflow(doc, crd_path)
        problems += wf_problems
        for manifest in manifests:
            problems += [
                f"embedded {object_label(manifest)}: {p}" for p in check_document(manifest, crd_path)
            ]
    elif kind == "Application":
        problems += check_argo_schema(doc, "Application")
        problems += check_application(doc)
    elif kind in ("Namespace", "ServiceAccount", "Role", "RoleBinding", "ConfigMap"):
        problems += check_builtin(doc)
    else:
        problems.append(f"[kind] unexpected kind {kind!r}")
    return problems
