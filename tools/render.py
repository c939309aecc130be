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

This file is the command line only: rendering and validation are tools/deploy/rendering.py, the
commands that talk to a cluster tools/deploy/cluster.py (through tools/deploy/kube.py).
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
from tools.deploy import checks, manifests  # noqa: E402
from tools.deploy.cluster import (  # noqa: E402
    STEPS_OF,
    cmd_logs,
    cmd_preflight,
    cmd_run,
    cmd_status,
    cmd_submit,
    cmd_wait,
)
from tools.deploy.rendering import (  # noqa: E402,F401 (render_all, validate_files: the API tests use)
    check_or_raise,
    crd_for,
    display_path,
    render_all,
    rendered_paths,
    validate_files,
)


def cmd_render(args) -> None:
    _, paths, _ = render_all(args.env, args.dataset, args.run, pathlib.Path(args.out))
    for path in paths:
        print(display_path(path))


def cmd_validate(args) -> None:
    crd = crd_for(args)
    paths = [pathlib.Path(p) for p in args.paths] or rendered_paths(pathlib.Path(args.out))
    if not paths:
        raise RecError(f"{args.out}: no rendered manifests (run `make render`)")
    check_or_raise(paths, crd)
    argo = all(path.is_file() for path, _, _ in checks.ARGO_CRDS.values())
    print(
        f"ok: {len(paths)} file(s) valid (JobSet CRD schema{' ' if crd else ' skipped, '}strict, "
        f"Argo Workflow/Application CRD schemas{' ' if argo else ' skipped, '}strict, batch/v1 strict, "
        f"{len(checks.GKE_RULES)} GKE TPU rules)"
    )


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
