#!/usr/bin/env python3
"""Render, validate, submit and follow the GKE TPU manifests of rec.

  render    k8s/values + k8s/templates -> k8s/rendered/<dataset>/{train,upload,eval,workflow}.yaml,
            k8s/rendered/grpo-gsm8k/train.yaml, argocd/application.yaml, cluster/setup.yaml (deterministic)
  validate  every rendered file: JobSet CRD schema (strict), batch/v1 (strict), GKE TPU rules
  preflight check the cluster: reachable, JobSet controller new enough (>= v0.10.0)
  submit    create one step's object (no waiting) unless its outputs are done;  wait: wait for one step
  status    state of every step of a dataset (and GRPO);  logs: last lines of each pod of a step
  train     render + validate + sft -> rl, waiting for each
  upload    render + validate + publish the trained checkpoint to the verified handoff
  eval      render + validate + eval of the verified handoff on a v6e-8 host
  pipeline  render + validate + sft -> rl -> upload -> eval, stopping at the first failure
  grpo      render + validate + GSM8K GRPO (rollout fast paths on unless ROLLOUT_FAST_*=0)
`--dry-run` prints the plan and touches no cluster. See docs/DEPLOY.md.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as `python tools/render.py` from anywhere
    sys.path.insert(0, str(ROOT))

from rec.errors import RecError  # noqa: E402
from tools.deploy import checks, kube, manifests, values  # noqa: E402

STEP_TIMEOUTS = {"sft": 48 * 3600, "rl": 48 * 3600, "upload": 2 * 3600, "eval": 12 * 3600, "grpo": 48 * 3600}
STEPS_OF = {
    "train": ["sft", "rl"],
    "upload": ["upload"],
    "eval": ["eval"],
    "pipeline": ["sft", "rl", "upload", "eval"],
    "grpo": ["grpo"],
}


def _datasets(arg: str, values_dir: pathlib.Path) -> list[str]:
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
    for name in _datasets(dataset_arg, values_dir):
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
            problems += [f"{_rel(path)}: {label}: {p}" for p in checks.check_document(doc, crd_path)]
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
                    f"{_rel(path)}: {checks.object_label(wf)}: [workflow] embedded {label} differs from "
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
        where = f"{_rel(path)}: {checks.object_label(doc)}: [run-config]"
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


def _rel(path: pathlib.Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _rendered_paths(out_dir: pathlib.Path) -> list[pathlib.Path]:
    return sorted(p for p in out_dir.rglob("*.yaml") if p.is_file())


def _check_or_raise(paths: list[pathlib.Path], crd_path: pathlib.Path | None) -> None:
    problems = validate_files(paths, crd_path)
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        raise RecError(f"{len(problems)} problem(s) in the rendered manifests (listed above)")


def _crd(args) -> pathlib.Path | None:
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


def _timeouts(args) -> dict[str, float]:
    if args.timeout:
        return {
            "default": kube.parse_duration(args.timeout),
            **{k: kube.parse_duration(args.timeout) for k in STEP_TIMEOUTS},
        }
    return dict(STEP_TIMEOUTS)


def _select_steps(action: str, steps: dict, dataset: str) -> list[manifests.Step]:
    if action == "grpo":
        return [steps["grpo"]["grpo"]]
    return [steps[dataset][name] for name in STEPS_OF[action]]


def _client(args, env) -> kube.KubeClient:
    hint = f"gcloud container clusters get-credentials {env.cluster} --location {env.location} --project {env.project}"
    return kube.KubeClient(
        context=args.context or env.context, kubeconfig=args.kubeconfig, credentials_hint=hint
    )


def cmd_render(args) -> None:
    _, paths, _ = render_all(args.env, args.dataset, args.run, pathlib.Path(args.out))
    for path in paths:
        print(_rel(path))


def cmd_validate(args) -> None:
    crd = _crd(args)
    paths = [pathlib.Path(p) for p in args.paths] or _rendered_paths(pathlib.Path(args.out))
    if not paths:
        raise RecError(f"{args.out}: no rendered manifests (run `make render`)")
    _check_or_raise(paths, crd)
    argo = all(path.is_file() for path, _, _ in checks.ARGO_CRDS.values())
    print(
        f"ok: {len(paths)} file(s) valid (JobSet CRD schema{' ' if crd else ' skipped, '}strict, "
        f"Argo Workflow/Application CRD schemas{' ' if argo else ' skipped, '}strict, batch/v1 strict, "
        f"{len(checks.GKE_RULES)} GKE TPU rules)"
    )


def cmd_run(args) -> None:
    """train | upload | eval | pipeline | grpo: render, validate, then run the steps."""
    dataset = args.dataset
    if args.action != "grpo" and dataset == "all":
        raise RecError(f"{args.action}: pick one dataset (DATASET=industrial or office), not 'all'")
    crd = _crd(args)
    env, paths, steps = render_all(
        args.env, dataset if args.action != "grpo" else args.dataset, args.run, pathlib.Path(args.out)
    )
    _check_or_raise(paths, crd)
    selected = _select_steps(args.action, steps, dataset)
    client = None if args.dry_run else _client(args, env)
    if client is not None:
        kube.preflight(client, selected)

    def hint(step):
        return kube.logs_hint(step, args.context or env.context, env.cluster, env.project)

    kube.run_steps(
        client,
        selected,
        _timeouts(args),
        poll=args.poll,
        dry_run=args.dry_run,
        progress=not args.no_progress,
        log_hint=hint,
    )
    if not args.dry_run:
        print(f"{args.action}: done")


def cmd_submit(args) -> None:
    crd = _crd(args)
    env, paths, steps = render_all(args.env, args.dataset, args.run, pathlib.Path(args.out))
    _check_or_raise(paths, crd)
    step = _one_step(args, steps)
    if args.dry_run:
        print(f"would create {step.kind} {step.namespace}/{step.object_name} from k8s/rendered/{step.file}")
        return
    if not kube.outputs_pending(step):
        print(f"{step.name}: outputs at {step.outputs[1]} are done; nothing to submit")
        return
    client = _client(args, env)
    if client.get(step.kind, step.namespace, step.object_name) is not None:
        print(f"{step.kind} {step.namespace}/{step.object_name} already exists")
        return
    kube.preflight(client, [step])
    client.create(step.doc)
    print(f"created {step.kind} {step.namespace}/{step.object_name}")


def cmd_wait(args) -> None:
    env, _, steps = render_all(args.env, args.dataset, args.run, pathlib.Path(args.out), write=False)
    step = _one_step(args, steps)
    client = _client(args, env)
    timeout = _timeouts(args).get(step.name, 48 * 3600)
    hint = kube.logs_hint(step, args.context or env.context, env.cluster, env.project)
    state = kube.wait_for(client, step, timeout, args.poll, progress=not args.no_progress, hint=hint)
    if state.phase == "Failed":
        raise RecError(
            f"{step.kind} {step.namespace}/{step.object_name} failed ({state.message or 'no reason given'}); logs: {hint}"
        )
    print(f"{step.kind} {step.namespace}/{step.object_name}: {state.phase}")


def cmd_preflight(args) -> None:
    env, _, steps = render_all(args.env, args.dataset, args.run, pathlib.Path(args.out), write=False)
    client = _client(args, env)
    kube.preflight(client, [s for by_name in steps.values() for s in by_name.values()])
    print(f"ok: {client.context or 'current context'}: JobSet controller >= {kube.MIN_JOBSET_VERSION} (CRD {kube.JOBSET_CRD})")


def cmd_status(args) -> None:
    env, _, steps = render_all(args.env, args.dataset, args.run, pathlib.Path(args.out), write=False)
    wanted = [s for name in _datasets(args.dataset, values.VALUES_DIR) for s in steps[name].values()]
    wanted += list(steps["grpo"].values())
    if args.dry_run:
        for step in wanted:
            print(f"would read {step.kind} {step.namespace}/{step.object_name}")
        return
    for line in kube.status_lines(_client(args, env), wanted):
        print(line)


def cmd_logs(args) -> None:
    env, _, steps = render_all(args.env, args.dataset, args.run, pathlib.Path(args.out), write=False)
    client = _client(args, env)
    if args.step:
        step = _one_step(args, steps)
    else:  # the latest step of the pipeline that was submitted
        order = list(steps[args.dataset].values()) if args.dataset != "all" else []
        submitted = [s for s in order if client.get(s.kind, s.namespace, s.object_name) is not None]
        if not submitted:
            raise RecError(
                f"nothing of {args.dataset} run {args.run or env.run} was submitted yet; "
                "name a step with STEP=sft|rl|upload|eval|grpo (make logs STEP=grpo)"
            )
        step = submitted[-1]
    for line in kube.log_lines(client, step, args.tail):
        print(line)


def _one_step(args, steps) -> manifests.Step:
    if args.step == "grpo":
        return steps["grpo"]["grpo"]
    if args.dataset == "all":
        raise RecError("--dataset: pick one dataset, not 'all'")
    return steps[args.dataset][args.step]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tools/render.py",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True

    def common(p, needs_dataset=True):
        p.add_argument(
            "--env", default=os.environ.get("ENV", "dev"), help="k8s/values/env/<ENV>.yaml (default dev)"
        )
        if needs_dataset:
            p.add_argument(
                "--dataset", default="industrial", help="k8s/values/dataset/<DATASET>.yaml, or 'all'"
            )
        p.add_argument(
            "--run", default="", help="run name (default: the env's `run`); a new name starts a new run"
        )
        p.add_argument("--out", default=str(manifests.RENDERED_DIR), help="rendered manifests directory")
        p.add_argument(
            "--crd", default="", help="JobSet CRD YAML (default ../shared/k8s/jobset.x-k8s.io_jobsets.yaml)"
        )

    def cluster(p):
        p.add_argument("--context", default="", help="kubeconfig context (default: the env's kube_context)")
        p.add_argument(
            "--kubeconfig", default=None, help="kubeconfig file (default $KUBECONFIG or ~/.kube/config)"
        )
        p.add_argument(
            "--timeout",
            default="",
            help="per step, e.g. 30m or 48h (defaults: train 48h, upload 2h, eval 12h)",
        )
        p.add_argument("--poll", type=float, default=30.0, help="seconds between status polls")
        p.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
        p.add_argument("--dry-run", action="store_true", help="print the plan; touch no cluster")

    p = sub.add_parser("render", help="write k8s/rendered/ from values and templates")
    common(p)
    p.set_defaults(fn=cmd_render)

    p = sub.add_parser("validate", help="check rendered manifests offline")
    p.add_argument("paths", nargs="*", help="files (default: every k8s/rendered/**/*.yaml)")
    p.add_argument("--out", default=str(manifests.RENDERED_DIR), help="rendered manifests directory")
    p.add_argument("--crd", default="", help="JobSet CRD YAML")
    p.set_defaults(fn=cmd_validate)

    for action in ("train", "upload", "eval", "pipeline", "grpo"):
        p = sub.add_parser(action, help=f"render, validate and run: {' -> '.join(STEPS_OF[action])}")
        common(p, needs_dataset=True)
        cluster(p)
        p.set_defaults(fn=cmd_run)

    p = sub.add_parser("submit", help="create one step's object without waiting")
    common(p)
    cluster(p)
    p.add_argument("--step", required=True, choices=["sft", "rl", "upload", "eval", "grpo"])
    p.set_defaults(fn=cmd_submit)

    p = sub.add_parser("wait", help="wait for one step's object to finish")
    common(p)
    cluster(p)
    p.add_argument("--step", required=True, choices=["sft", "rl", "upload", "eval", "grpo"])
    p.set_defaults(fn=cmd_wait)

    p = sub.add_parser("logs", help="last log lines of every pod of a step (default: the latest submitted)")
    common(p)
    cluster(p)
    p.add_argument("--step", default="", choices=["", "sft", "rl", "upload", "eval", "grpo"])
    p.add_argument("--tail", type=int, default=100, help="lines per pod (default 100)")
    p.set_defaults(fn=cmd_logs)

    p = sub.add_parser("preflight", help="check the cluster: reachable, JobSet controller new enough")
    common(p)
    cluster(p)
    p.set_defaults(fn=cmd_preflight)

    p = sub.add_parser("status", help="state of the dataset's (and GRPO's) JobSets and Job")
    common(p)
    cluster(p)
    p.set_defaults(fn=cmd_status)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except RecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (objects already created keep running; `make status`)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
