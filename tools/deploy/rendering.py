"""Render the manifests of every dataset, GRPO, Argo CD and the cluster setup, and validate files.

`render_all` checks every value and every run config the values name before anything is written;
`validate_files` runs the layers of `tools.deploy.checks` on each file plus the checks that need
several files at once (the Workflow embeds exactly the standalone objects; the run configs named
in the manifests load and fit their stage). The command line is tools/render.py.
"""

from __future__ import annotations

import pathlib
import sys

from rec.errors import RecError
from tools.deploy import checks, manifests, values
from tools.deploy.values import ROOT


def datasets_of(arg: str, values_dir: pathlib.Path) -> list[str]:
    if arg == "all":
        return values.list_datasets(values_dir)
    return [arg]


def render_all(
    env_name: str,
    dataset_arg: str,
    run: str | None,
    out_dir: pathlib.Path,
    values_dir: pathlib.Path | None = None,
    environ: dict | None = None,
    write: bool = True,
    config_root: pathlib.Path | None = None,
):
    """Render the dataset(s), GRPO, the Argo CD Application and the cluster setup; write them to
    `out_dir` unless `write` is false (status/wait only need the names). Values come from
    `values_dir` (default k8s/values), the run configs they name from `config_root` (default this
    checkout); every value and named config is checked before anything is written.
    Returns (env values, written paths, {dataset or "grpo": {step name: Step}})."""
    values_dir = values.VALUES_DIR if values_dir is None else values_dir
    env = values.load_env(env_name, values_dir)
    run_name = values.check_run(run, "--run / RUN") if run else env.run
    files: list[manifests.RenderedFile] = []
    steps: dict[str, dict[str, manifests.Step]] = {}
    for name in datasets_of(dataset_arg, values_dir):
        ds = values.load_dataset(name, values_dir, config_root)
        ds_files, ds_steps = manifests.plan_dataset(env, ds, run_name)
        files += ds_files
        steps[name] = {s.name: s for s in ds_steps}
    grpo = values.load_grpo("gsm8k", values_dir, config_root)
    grpo_files, grpo_steps = manifests.plan_grpo(env, grpo, run_name, environ)
    files += grpo_files
    steps["grpo"] = {s.name: s for s in grpo_steps}
    files += manifests.plan_argocd(env)
    files += manifests.plan_cluster(env)
    paths = manifests.write_rendered(files, out_dir, env_name) if write else []
    return env, paths, steps


def validate_files(
    paths: list[pathlib.Path],
    crd_path: pathlib.Path | None = checks.CRD_PATH,
    config_root: pathlib.Path | None = None,
) -> list[str]:
    """Problems of every file, as `file: Kind/name: [rule] message` lines (run configs the manifests
    name are looked up under `config_root`, default this checkout)."""
    problems = []
    objects: list[tuple[pathlib.Path, dict]] = []
    by_dir: dict[pathlib.Path, dict[str, dict]] = {}
    workflows = []
    for path in paths:
        try:
            docs = manifests.read_rendered(path)
        except RecError as exc:
            problems.append(str(exc))
            continue
        for doc in docs:
            label = checks.object_label(doc) if isinstance(doc, dict) else "?"
            problems += [f"{display_path(path)}: {label}: {p}" for p in checks.check_document(doc, crd_path)]
            if isinstance(doc, dict) and doc.get("kind") == "Workflow":
                workflows.append((path, doc))
            elif isinstance(doc, dict):
                by_dir.setdefault(path.parent, {})[label] = doc
                objects.append((path, doc))
    # The Workflow must create exactly what the standalone files say (one source of truth).
    for path, wf in workflows:
        _, embedded = checks.check_workflow(wf, None)
        siblings = by_dir.get(path.parent, {})
        for manifest in embedded:
            label = checks.object_label(manifest)
            if label not in siblings:  # validated without its standalone file: check its configs here
                objects.append((path, manifest))
            elif siblings[label] != manifest:
                problems.append(
                    f"{display_path(path)}: {checks.object_label(wf)}: [workflow] embedded {label} differs from "
                    f"the one in {path.parent.name}/ (render both from the same values)"
                )
    problems += config_problems(objects, values.CONFIG_ROOT if config_root is None else config_root)
    return problems


def _as_list(value) -> list:
    return value if isinstance(value, list) else []


def _run_refs(doc: dict) -> tuple[str, list[str], str]:
    """(component, run configs, handoff tag) a JobSet or Job names: `rec <stage> --config X`
    arguments, the eval pod's REC_CONFIG, and `rec handoff publish --tag T` / REC_TAG."""
    component = str(((doc.get("metadata") or {}).get("labels") or {}).get("app.kubernetes.io/component", ""))
    configs, tag = [], ""
    for container in checks.containers(doc):
        args = [str(a) for key in ("command", "args") for a in _as_list(container.get(key))]
        for flag, arg in zip(args, args[1:], strict=False):
            if flag == "--config":
                configs.append(arg)
            elif flag == "--tag" and args[:3] == ["rec", "handoff", "publish"]:
                tag = arg
        for var in _as_list(container.get("env")):
            if not isinstance(var, dict):
                continue
            if var.get("name") == "REC_CONFIG" and "value" in var:
                configs.append(str(var["value"]))
            elif var.get("name") == "REC_TAG" and "value" in var:
                tag = str(var["value"])
    return component, configs, tag


def config_problems(objects: list[tuple[pathlib.Path, dict]], root: pathlib.Path) -> list[str]:
    """Run configs the manifests name: each must be in the checkout (the image is built from it) and
    load with rec.config.load_config; the eval pod's must be an eval config; the handoff tag must
    be one the RL run of the same dataset produces."""
    problems = []
    rl_config: dict[pathlib.Path, tuple[str, object]] = {}
    tags = []
    for path, doc in objects:
        component, configs, tag = _run_refs(doc)
        where = f"{display_path(path)}: {checks.object_label(doc)}: [run-config]"
        for name in configs:
            try:
                cfg = values.load_run_config(name, f"{where} config", root)
            except RecError as exc:
                problems.append(str(exc))
                continue
            if component == "eval":
                problem = values.eval_config_problem(name, root)
                if problem:
                    problems.append(f"{where} config = {name!r}: {problem}")
            elif component == "rl":
                rl_config[path.parent] = (name, cfg)
        if tag:
            tags.append((path, where, tag))
    for path, where, tag in tags:
        if path.parent in rl_config:
            name, cfg = rl_config[path.parent]
            problem = values.handoff_tag_problem(tag, cfg, name)
        elif tag not in (values.RL_TAG_LAST, values.RL_TAG_BEST):
            problem = f"not a tag the RL run produces ({values.RL_TAG_LAST} or {values.RL_TAG_BEST})"
        else:
            problem = ""
        if problem:
            problems.append(f"{where} handoff tag = {tag!r}: {problem}")
    return problems


def display_path(path: pathlib.Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def rendered_paths(out_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in out_dir.rglob("*.yaml") if p.is_file())


def check_or_raise(paths: list[pathlib.Path], crd_path: pathlib.Path | None) -> None:
    problems = validate_files(paths, crd_path)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        raise RecError(f"{len(problems)} problem(s) in the rendered manifests (listed above)")


def crd_for(args) -> pathlib.Path | None:
    """The JobSet CRD to check against, loaded up front. A --crd the user names must exist and be
    the JobSet CRD; only the default location (../shared/k8s/, absent outside the workspace) may be
    missing, in which case the schema check is skipped with a note."""
    if not args.crd and not checks.CRD_PATH.is_file():
        print(
            f"note: {checks.CRD_PATH} not found: JobSet CRD schema check skipped "
            "(batch/v1 and GKE rules still run)",
            file=sys.stderr,
        )
        return None
    path = pathlib.Path(args.crd) if args.crd else checks.CRD_PATH
    if args.crd and not path.is_file():
        raise RecError(f"--crd {args.crd}: file not found")
    checks.crd_validator(str(path))  # a file that is not the JobSet CRD: one line, before any work
    return path
