"""The commands that talk to a cluster: run steps (train, upload, eval, pipeline, grpo), submit,
wait, preflight, status and logs. Each renders and validates first (tools.deploy.rendering), then
goes through tools.deploy.kube."""

from __future__ import annotations

import pathlib

from rec.errors import RecError
from tools.deploy import kube, manifests, values
from tools.deploy.rendering import check_or_raise, crd_for, datasets_of, render_all

STEP_TIMEOUTS = {"sft": 48 * 3600, "rl": 48 * 3600, "upload": 2 * 3600, "eval": 12 * 3600, "grpo": 48 * 3600}
STEPS_OF = {
    "train": ["sft", "rl"],
    "upload": ["upload"],
    "eval": ["eval"],
    "pipeline": ["sft", "rl", "upload", "eval"],
    "grpo": ["grpo"],
}


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


def cmd_run(args) -> None:
    """train | upload | eval | pipeline | grpo: render, validate, then run the steps."""
    dataset = args.dataset
    if args.action != "grpo" and dataset == "all":
        raise RecError(f"{args.action}: pick one dataset (DATASET=industrial or office), not 'all'")
    crd = crd_for(args)
    env, paths, steps = render_all(
        args.env, dataset if args.action != "grpo" else args.dataset, args.run, pathlib.Path(args.out)
    )
    check_or_raise(paths, crd)
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
    crd = crd_for(args)
    env, paths, steps = render_all(args.env, args.dataset, args.run, pathlib.Path(args.out))
    check_or_raise(paths, crd)
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
    wanted = [s for name in datasets_of(args.dataset, values.VALUES_DIR) for s in steps[name].values()]
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
