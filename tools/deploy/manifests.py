"""Render the GKE manifests from k8s/templates/ and validated values.

How values reach YAML: templates may insert a value only through the `q` filter, which writes it
as a JSON scalar (a quoted, escaped string, a number or a boolean). `finalize` refuses any other
`{{ ... }}` output, so a template cannot splice raw text by mistake. The rendered text is then
parsed with yaml.safe_load and written back with yaml.safe_dump: the files on disk are canonical,
deterministic (same values -> same bytes, so GitOps diffs stay clean) and provably a data structure
rather than text that happened to look right.

What gets rendered (`plan_dataset`, `plan_grpo`):
  k8s/rendered/<dataset>/train.yaml     JobSets `sft-<dataset>-<run>` then `rl-<dataset>-<run>` (v6e-16)
  k8s/rendered/<dataset>/upload.yaml    CPU Job publishing rl_last to the verified handoff prefix
  k8s/rendered/<dataset>/eval.yaml      JobSet on one v6e-8 host, reading only a verified handoff
  k8s/rendered/<dataset>/workflow.yaml  Argo Workflow: sft -> rl -> upload -> eval
  k8s/rendered/grpo-gsm8k/train.yaml    GSM8K GRPO JobSet (v6e-16)
  k8s/rendered/argocd/application.yaml  Argo CD Application over k8s/rendered/ (workflows only)
  k8s/rendered/cluster/setup.yaml       namespace, service accounts, the Workflow's RBAC (apply once)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any

from rec.errors import FAIL_FAST_EXIT_CODES, RecError
from tools.deploy.values import (
    ROLLOUT_VARS,
    ROOT,
    DatasetValues,
    EnvValues,
    GrpoValues,
    read_text,
    rollout_flag,
)

TEMPLATES_DIR = ROOT / "k8s" / "templates"
RENDERED_DIR = ROOT / "k8s" / "rendered"

# Slice shapes (reference/gke-tpu.md 1.1): hosts = VMs = pods, chips per host, topology label.
# hostNetwork stays off for one slice (its hosts talk over ICI); env value tpu_host_network turns it on
# for the multi-host shapes, for multislice (DCN) only.
V6E_16 = {"hosts": 4, "chips": 4, "topology": "4x4", "instance_type": "", "host_network": False}
V6E_8 = {
    "hosts": 1,
    "chips": 8,
    "topology": "2x4",
    "instance_type": "ct6e-standard-8t",
    "host_network": False,
}

DATA_MOUNT = "/data"
# Read-only dataset mount: listing without placeholder objects, caches that never expire (the data
# do not change during a run) and parallel downloads into the file cache.
FUSE_MOUNT_OPTIONS = "implicit-dirs,metadata-cache:ttl-secs:-1,file-cache:max-size-mb:-1,file-cache:enable-parallel-downloads:true"
HEADER = "# Rendered by tools/render.py from {template} (env={env}). Do not edit: change k8s/values or k8s/templates and run `make render`.\n"


class Quoted(str):
    """A value already written as a JSON scalar by the `q` filter."""


def _q(value: Any) -> Quoted:
    if isinstance(value, (dict, list, tuple)) or value is None:
        raise RecError(f"template: only strings, numbers and booleans may be inserted with |q, got {value!r}")
    return Quoted(json.dumps(value, ensure_ascii=True))


def _finalize(value: Any) -> Any:
    if isinstance(value, Quoted):
        return value
    raise RecError(f"template: value {value!r} inserted without the |q filter (values must go through |q)")


_JINJA: dict[str, object] = {}  # one Environment per templates directory


def jinja_env(templates_dir: pathlib.Path = TEMPLATES_DIR):
    import jinja2  # noqa: PLC0415 (deployment-only dependency)

    key = str(templates_dir)
    if key not in _JINJA:
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(key),
            undefined=jinja2.StrictUndefined,
            finalize=_finalize,
            autoescape=False,
            keep_trailing_newline=True,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        env.filters["q"] = _q
        _JINJA[key] = env
    return _JINJA[key]


def render_template(name: str, context: dict, templates_dir: pathlib.Path = TEMPLATES_DIR) -> list[dict]:
    """Render one template to YAML documents (parsed; never returned as text)."""
    import jinja2  # noqa: PLC0415
    import yaml  # noqa: PLC0415

    try:
        text = jinja_env(templates_dir).get_template(name).render(**context)
    except jinja2.TemplateError as exc:
        raise RecError(f"k8s/templates/{name}: {exc}") from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise RecError(f"k8s/templates/{name}: rendered text is not valid YAML ({exc})") from None
    return docs


class _Dumper:
    """yaml.SafeDumper with literal blocks for multi-line strings (embedded manifests)."""

    _cls = None

    @classmethod
    def get(cls):
        import yaml  # noqa: PLC0415

        if cls._cls is None:

            class Dumper(yaml.SafeDumper):
                pass

            def str_rep(dumper, data):
                style = "|" if "\n" in data else None
                return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

            Dumper.add_representer(str, str_rep)
            cls._cls = Dumper
        return cls._cls


def dump_yaml(obj: Any) -> str:
    import yaml  # noqa: PLC0415

    return yaml.dump(obj, Dumper=_Dumper.get(), sort_keys=False, default_flow_style=False, width=4096)


def dump_documents(docs: list[dict], header: str = "") -> str:
    return header + "---\n".join(dump_yaml(d) for d in docs)


# ---------------------------------------------------------------------------------------------
# What to render


@dataclasses.dataclass
class RenderedFile:
    path: str  # relative to the rendered directory, e.g. industrial/train.yaml
    template: str
    docs: list[dict]


@dataclasses.dataclass
class Step:
    """One thing `pipeline` submits and waits for."""

    name: str  # sft | rl | upload | eval | grpo
    file: str  # rendered file it comes from
    doc: dict
    # What the step leaves when it is done (rec.storage.outputs): (kind, path, eval split).
    outputs: tuple[str, str, str] = ("", "", "")

    @property
    def kind(self) -> str:
        return self.doc["kind"]

    @property
    def object_name(self) -> str:
        return self.doc["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.doc["metadata"]["namespace"]


@dataclasses.dataclass
class DatasetPaths:
    root: str
    sft: str
    rl: str
    eval: str
    handoff: str


def dataset_paths(env: EnvValues, ds: DatasetValues, run: str) -> DatasetPaths:
    root = f"gs://{env.bucket}/runs/{ds.name}/{run}"
    return DatasetPaths(
        root=root,
        sft=f"{root}/sft",
        rl=f"{root}/rl",
        eval=f"{root}/eval",
        handoff=f"gs://{env.bucket}/handoff/{ds.name}/{run}/{ds.handoff_tag}",
    )


def _labels(component: str, dataset: str, run: str) -> dict:
    return {
        "app.kubernetes.io/name": "rec",
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/instance": f"{dataset}-{run}",
        "rec/dataset": dataset,
        "rec/run": run,
    }


def _tpu_env(env: EnvValues, extra: dict | None = None) -> list[tuple[str, str]]:
    pairs = {"JAX_PLATFORMS": "tpu", "PYTHONUNBUFFERED": "1"}
    pairs.update(env.extra_env)
    pairs.update(extra or {})
    pairs["JAX_PLATFORMS"] = "tpu"  # a broken TPU init must fail, never fall back to CPU
    return sorted(pairs.items())


def _tpu_context(
    env: EnvValues,
    *,
    name: str,
    component: str,
    dataset: str,
    run: str,
    slice_shape: dict,
    args: list[str],
    extra_env: dict | None = None,
    sync_wave: int = 0,
    wait_for: dict | None = None,
) -> dict:
    if slice_shape["hosts"] > 1:
        slice_shape = {**slice_shape, "host_network": env.tpu_host_network}
    return {
        "name": name,
        "namespace": env.namespace,
        "labels": _labels(component, dataset, run),
        "sync_wave": str(sync_wave),
        "slice": slice_shape,
        "image": env.image,
        "args": args,
        "env_pairs": _tpu_env(env, extra_env),
        "wandb_secret": env.wandb_secret,
        "service_account": env.service_account,
        "data_bucket": env.data_bucket or env.bucket,
        "data_mount": DATA_MOUNT,
        "fuse_mount_options": FUSE_MOUNT_OPTIONS,
        "fuse_host_network_pod_ksa": env.fuse_host_network_pod_ksa and slice_shape["host_network"],
        "ttl": env.ttl_seconds_after_finished,
        "max_restarts": env.max_restarts,
        "grace": env.termination_grace_period_seconds,
        "run_as_root": env.tpu_run_as_root,
        "privileged": env.privileged,
        "node_identity": env.tpu_host_network_node_identity,
        "priority_class": env.priority_class,
        "queue_name": env.kueue_queue,
        "fail_fast_exit_codes": list(FAIL_FAST_EXIT_CODES),
        "wait_for": wait_for,
    }


# How long a step applied with plain `kubectl apply` waits for its input (rec outputs wait): RL for
# SFT (and gives its slice back after 10 minutes if SFT has not even started: one free slice), the
# upload for RL, eval for the handoff (through SFT, RL and the upload).
WAIT_START_TIMEOUT = "10m"


def wait_for_input(kind: str, path: str, timeout: str, start_timeout: str = "") -> dict:
    args = ["rec", "outputs", "wait", kind, path, "--timeout", timeout]
    if start_timeout:
        args += ["--start-timeout", start_timeout]
    return {"args": args}


def _training_jobset(env: EnvValues, ds: DatasetValues, run: str, stage: str, args: list[str], **extra) -> dict:
    """The sft or rl JobSet of a dataset on a v6e-16 slice."""
    context = _tpu_context(
        env, name=f"{stage}-{ds.name}-{run}", component=stage, dataset=ds.name, run=run,
        slice_shape=V6E_16, args=args, **extra,
    )
    return render_template("tpu-jobset.yaml.j2", context)[0]


def _sft_jobset(env: EnvValues, ds: DatasetValues, run: str, paths: DatasetPaths) -> dict:
    args = ["rec", "sft", "--config", ds.sft_config, f"run.dir={paths.sft}",
            f"model.path={DATA_MOUNT}/{ds.base_model}", f"data.dir={DATA_MOUNT}/{ds.data_dir}"]
    return _training_jobset(env, ds, run, "sft", args, sync_wave=0)


def _rl_jobset(env: EnvValues, ds: DatasetValues, run: str, paths: DatasetPaths) -> dict:
    args = ["rec", "rl", "--config", ds.rl_config, f"run.dir={paths.rl}", f"model.path={paths.sft}",
            "model.checkpoint=sft_best", f"data.dir={DATA_MOUNT}/{ds.data_dir}"]
    wait = wait_for_input("run", paths.sft, "48h", WAIT_START_TIMEOUT)
    return _training_jobset(env, ds, run, "rl", args, sync_wave=1, wait_for=wait)


def _upload_job(env: EnvValues, ds: DatasetValues, run: str, paths: DatasetPaths) -> dict:
    context = {
        "name": f"upload-{ds.name}-{run}",
        "namespace": env.namespace,
        "labels": _labels("upload", ds.name, run),
        "sync_wave": "2",
        "image": env.image,
        "args": ["rec", "handoff", "publish", "--run", paths.rl, "--to", paths.handoff, "--tag", ds.handoff_tag],
        "service_account": env.service_account,
        "ttl": env.ttl_seconds_after_finished,
        "wait_for": wait_for_input("run", paths.rl, "96h"),
    }
    return render_template("upload-job.yaml.j2", context)[0]


# The eval pod verifies the handoff's MANIFEST.json before loading anything from it. The shell line
# is constant text; the values reach it only as environment variables.
EVAL_SCRIPT = (
    "set -e\n"
    'rec handoff verify "$REC_HANDOFF"\n'
    'exec rec eval --config "$REC_CONFIG" "run.dir=$REC_RUN_DIR" "model.path=$REC_HANDOFF" \\\n'
    '  "model.checkpoint=$REC_TAG" "data.dir=$REC_DATA_DIR" "data.split=$REC_SPLIT"\n'
)


def _eval_jobset(env: EnvValues, ds: DatasetValues, run: str, paths: DatasetPaths) -> dict:
    variables = {
        "REC_HANDOFF": paths.handoff,
        "REC_CONFIG": ds.eval_config,
        "REC_RUN_DIR": paths.eval,
        "REC_TAG": ds.handoff_tag,
        "REC_DATA_DIR": f"{DATA_MOUNT}/{ds.data_dir}",
        "REC_SPLIT": ds.eval_split,
    }
    context = _tpu_context(
        env, name=f"eval-{ds.name}-{run}", component="eval", dataset=ds.name, run=run, slice_shape=V6E_8,
        args=["bash", "-c", EVAL_SCRIPT], extra_env=variables, sync_wave=3,
        wait_for=wait_for_input("handoff", paths.handoff, "120h"),
    )
    return render_template("tpu-jobset.yaml.j2", context)[0]


def _workflow(env: EnvValues, ds: DatasetValues, run: str, steps: list[Step], upload_backoff: int) -> dict:
    context = {
        "name": f"rec-{ds.name}-{run}",
        "namespace": env.namespace,
        "labels": _labels("pipeline", ds.name, run),
        "service_account": env.workflow_service_account,
        "runner_service_account": env.service_account,
        "image": env.image,
        "steps": [_workflow_step(s, steps[i - 1] if i else None) for i, s in enumerate(steps)],
        "upload_backoff_limit": upload_backoff,
    }
    return render_template("workflow.yaml.j2", context)[0]


def plan_dataset(env: EnvValues, ds: DatasetValues, run: str) -> tuple[list[RenderedFile], list[Step]]:
    paths = dataset_paths(env, ds, run)
    sft, rl = _sft_jobset(env, ds, run, paths), _rl_jobset(env, ds, run, paths)
    upload, evaluation = _upload_job(env, ds, run, paths), _eval_jobset(env, ds, run, paths)
    steps = [
        Step("sft", f"{ds.name}/train.yaml", sft, ("run", paths.sft, "")),
        Step("rl", f"{ds.name}/train.yaml", rl, ("run", paths.rl, "")),
        Step("upload", f"{ds.name}/upload.yaml", upload, ("handoff", paths.handoff, "")),
        Step("eval", f"{ds.name}/eval.yaml", evaluation, ("eval", paths.eval, ds.eval_split)),
    ]
    workflow = _workflow(env, ds, run, steps, upload["spec"]["backoffLimit"])
    files = [
        RenderedFile(f"{ds.name}/train.yaml", "tpu-jobset.yaml.j2", [sft, rl]),
        RenderedFile(f"{ds.name}/upload.yaml", "upload-job.yaml.j2", [upload]),
        RenderedFile(f"{ds.name}/eval.yaml", "tpu-jobset.yaml.j2", [evaluation]),
        RenderedFile(f"{ds.name}/workflow.yaml", "workflow.yaml.j2", [workflow]),
    ]
    return files, steps


def _workflow_step(step: Step, previous: Step | None) -> dict:
    """What the Workflow template needs of one step: its object, its outputs, and what it follows
    (the previous step succeeded, or was skipped because its outputs were already done)."""
    kind, path, split = step.outputs
    after = ""
    if previous is not None:
        after = f"{previous.name}-done.Succeeded && ({previous.name}.Succeeded || {previous.name}.Skipped)"
    return {
        "name": step.name,
        "kind": step.kind,
        "manifest": dump_yaml(step.doc),
        "after": after,
        "outputs_kind": kind,
        "outputs_path": path,
        "outputs_split": split,
    }


def plan_grpo(
    env: EnvValues, grpo: GrpoValues, run: str, environ: dict | None = None
) -> tuple[list[RenderedFile], list[Step]]:
    environ = dict(os.environ if environ is None else environ)
    flags = {name: rollout_flag(name, environ) for name in ROLLOUT_VARS}
    run_dir = f"gs://{env.bucket}/runs/grpo-{grpo.name}/{run}"
    docs = render_template(
        "tpu-jobset.yaml.j2",
        _tpu_context(
            env,
            name=f"grpo-{grpo.name}-{run}",
            component="grpo",
            dataset=f"grpo-{grpo.name}",
            run=run,
            slice_shape=V6E_16,
            args=[
                "rec",
                "grpo",
                "--config",
                grpo.config,
                f"run.dir={run_dir}",
                f"model.path={DATA_MOUNT}/{grpo.base_model}",
                f"data.dir={DATA_MOUNT}/{grpo.data_dir}",
            ],
            extra_env=flags,
            sync_wave=0,
        ),
    )
    directory = f"grpo-{grpo.name}"
    return [RenderedFile(f"{directory}/train.yaml", "tpu-jobset.yaml.j2", docs)], [
        Step("grpo", f"{directory}/train.yaml", docs[0], ("run", run_dir, ""))
    ]


def plan_cluster(env: EnvValues) -> list[RenderedFile]:
    docs = render_template(
        "cluster-setup.yaml.j2",
        {
            "namespace": env.namespace,
            "service_account": env.service_account,
            "workflow_service_account": env.workflow_service_account,
        },
    )
    return [RenderedFile("cluster/setup.yaml", "cluster-setup.yaml.j2", docs)]


def plan_argocd(env: EnvValues) -> list[RenderedFile]:
    docs = render_template(
        "argocd-application.yaml.j2",
        {
            "name": f"rec-{env.name}",
            "argocd_namespace": env.argocd_namespace,
            "namespace": env.namespace,
            "repo_url": env.repo_url,
            "target_revision": env.target_revision,
            "path": "k8s/rendered",
            # Only Workflows: each run is one immutable object that owns its JobSets (see the template).
            "include": "*/workflow.yaml",
        },
    )
    return [RenderedFile("argocd/application.yaml", "argocd-application.yaml.j2", docs)]


def write_rendered(files: list[RenderedFile], out_dir: pathlib.Path, env_name: str) -> list[pathlib.Path]:
    """Write each file atomically; unchanged files are left untouched (mtime stays)."""
    from rec.storage import write_text  # noqa: PLC0415

    written = []
    for f in files:
        path = out_dir / f.path
        text = dump_documents(f.docs, HEADER.format(template=f"k8s/templates/{f.template}", env=env_name))
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            write_text(str(path), text)
        written.append(path)
    return written


def read_rendered(path: pathlib.Path) -> list[dict]:
    import yaml  # noqa: PLC0415

    if not path.is_file():
        raise RecError(f"{path}: not rendered yet (run `make render`)")
    text = read_text(path, str(path))
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise RecError(f"{path}: not valid YAML ({exc})") from None
