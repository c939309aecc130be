"""`rec` command line: one entry point, subcommands dispatch to the stage modules.

Heavy modules (jax, transformers) are imported inside each handler so `rec --help` is instant and
a bad config is reported before any accelerator initialises. Every `RecError` becomes one line on
stderr and exit status 2, as does an OSError on a path the user named; Ctrl-C exits 130.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys

from rec.errors import (
    EXIT_INPUT_NOT_STARTED,
    EXIT_RESOURCE_EXHAUSTED,
    InputNotStarted,
    RecError,
    resource_exhausted,
)


def _int_at_least(low: int):
    """An argparse type: an integer >= `low` (argparse then reports a bad value in one line, exit 2)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    return parse


POSITIVE = _int_at_least(1)


def _config_command(sub, name: str, help_text: str, default_config: str | None = None):
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--config", default=default_config, help="YAML run config (configs/...)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted overrides, e.g. train.steps=100")
    return p


def _load(args):
    from rec.config import load_config

    return load_config(args.config, args.overrides)


def _mark_completed(cfg, stage: str) -> None:
    """COMPLETED.json, last: the stage returned normally (a preempted run raised instead)."""
    from rec import dist
    from rec.storage.outputs import mark_completed

    if dist.is_primary():
        mark_completed(cfg.run.dir, stage)


def cmd_sft(args):
    cfg = _load(args)  # config errors before any heavy import
    from rec.train.sft import run_sft

    run_sft(cfg)
    _mark_completed(cfg, "sft")


def _require_finished_sft(cfg, allow_unfinished: bool) -> None:
    """RL from a run directory (not a Hugging Face model or a handoff) needs that run finished: a
    running SFT's sft_best is only its best so far."""
    from rec import storage
    from rec.storage.outputs import COMPLETED, completion

    source = cfg.model.path
    if allow_unfinished or not source or not storage.isdir(storage.join(source, "checkpoints")):
        return
    if completion(source) is None:
        raise RecError(
            f"model.path={source}: this SFT run has not finished (no {COMPLETED}), so its "
            f"{cfg.model.checkpoint or 'checkpoint'} may be a best-so-far of a run still training; wait for "
            "it (`rec outputs wait run ...`), or pass --allow-unfinished-sft to use it anyway"
        )


def cmd_rl(args):
    cfg = _load(args)  # config errors before any heavy import
    _require_finished_sft(cfg, args.allow_unfinished_sft)
    from rec.train.rl import run_rl

    run_rl(cfg)
    _mark_completed(cfg, "rl")


def cmd_grpo(args):
    cfg = _load(args)  # config errors before any heavy import
    from rec.train.grpo import run_grpo

    run_grpo(cfg)
    _mark_completed(cfg, "grpo")


def cmd_outputs_check(args):
    from rec.storage.outputs import not_done

    reason = not_done(args.kind, args.path, args.split)
    if reason:
        print(reason, file=sys.stderr)
    print("pending" if reason else "done")  # the only stdout line: the Argo Workflow reads it


def cmd_outputs_wait(args):
    from rec.storage.outputs import wait_done

    start_timeout = _duration(args.start_timeout) if args.start_timeout else 0.0
    wait_done(args.kind, args.path, _duration(args.timeout), poll=args.poll, split=args.split,
              start_timeout=start_timeout)
    print(f"{args.path}: done")


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise RecError(f"--timeout {text!r}: expected seconds or a duration like 30m, 48h") from None
    if value <= 0:
        raise RecError(f"--timeout {text!r}: must be positive")
    return value


def cmd_eval(args):
    cfg = _load(args)  # config errors before any heavy import
    from rec.eval.evaluate import run_eval

    run_eval(cfg)


def cmd_demo(args):
    from rec.demo import run_demo

    run_demo(out=args.out, rl=not args.no_rl, quick=args.quick)


def cmd_data_synth(args):
    from rec.data.synth import synthesize

    path = synthesize(args.out, users=args.users, items=args.items, seed=args.seed, levels=args.levels)
    print(path)


def cmd_data_check(args):
    from rec.data.check import check_dataset

    problems = check_dataset(args.dir, max_problems=args.max_problems)
    for line in problems:
        print(line)
    if problems:
        raise RecError(f"{args.dir}: {len(problems)} problem(s) found (listed above)")
    print(f"{args.dir}: ok")


def cmd_tokenizer_build(args):
    from rec.tokenizer import build_tokenizer

    print(build_tokenizer(args.dataset, args.out, vocab_size=args.vocab_size))


def cmd_metrics(args):
    from rec.eval.metrics import metrics_main

    metrics_main(args.predictions, args.info, as_json=args.json)


def cmd_export(args):
    from rec.model.hf_io import export_model

    print(export_model(args.model, args.out, checkpoint=args.checkpoint, dtype=args.dtype))


def cmd_bench(args):
    from rec.bench import run_bench

    run_bench(args)


def cmd_baselines(args):
    from rec.eval.baselines import run_baselines

    if args.seeds < 0:
        raise RecError(f"--seeds: expected >= 0, got {args.seeds}")
    if args.epochs <= 0:
        raise RecError(f"--epochs: expected > 0, got {args.epochs}")
    from rec.eval.sasrec import SASRecConfig

    run_baselines(args.data, split=args.split, out=args.out, train_from=args.train_from,
                  select_fraction=args.select_fraction, seeds=list(range(args.seeds)),
                  sasrec_cfg=SASRecConfig(max_epochs=args.epochs))


def cmd_recipe(args):
    from rec.recipe import run_recipe, write_recipe

    if args.configs_only:
        if args.overrides:
            raise RecError("recipe: --set overrides apply to a run, not to --configs-only")
        print(write_recipe(args.name, args.out or "configs/recipes/small-cpu", data_dir=args.data, seed=args.seed))
        return
    if args.baseline_seeds < 0:
        raise RecError(f"--baseline-seeds: expected >= 0, got {args.baseline_seeds}")
    run_recipe(args.name, args.data, args.out or "runs/small-cpu", seed=args.seed, overrides=args.overrides,
               baseline_seeds=list(range(args.baseline_seeds)))


def cmd_launch(args):
    from rec.dist.launch import launch_local

    rec_args = list(args.rec_args)
    if rec_args[:1] == ["--"]:
        rec_args = rec_args[1:]
    return launch_local(rec_args, args.processes, args.cpu_devices, log_dir=args.log_dir or None)


def cmd_handoff_publish(args):
    from rec.storage.handoff import publish

    result = publish(args.run, args.to, args.tag, step=args.step, progress=not args.no_progress)
    print(f"{result['checkpoint']}: {result['objects']} objects ({result['copied']} copied, "
          f"{result['already_present']} already present); MANIFEST.json written")


def cmd_handoff_verify(args):
    from rec.storage.handoff import verify

    print(verify(args.prefix))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rec",
        description="Generative recommendation with semantic IDs (SFT, RL, eval) and GSM8K GRPO in JAX.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    _config_command(sub, "sft", "Supervised fine-tuning on the MiniOneRec task mixture").set_defaults(fn=cmd_sft)
    p = _config_command(sub, "rl", "Recommendation RL (GRPO with constrained-beam rollouts)")
    p.add_argument("--allow-unfinished-sft", action="store_true",
                   help="start from an SFT run directory that has no COMPLETED.json yet")
    p.set_defaults(fn=cmd_rl)
    _config_command(sub, "eval", "Constrained beam search eval: HR@K / NDCG@K").set_defaults(fn=cmd_eval)
    _config_command(sub, "grpo", "GRPO post-training on GSM8K").set_defaults(fn=cmd_grpo)

    p = sub.add_parser("demo", help="Whole pipeline on generated data, on CPU, with an HTML report")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--no-rl", action="store_true", help="skip the RL stage")
    p.add_argument("--quick", action="store_true", help="smallest settings (used by tests)")
    p.set_defaults(fn=cmd_demo)

    p = sub.add_parser("data", help="Dataset tools")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")
    dsub.required = True
    s = dsub.add_parser("synth", help="Generate a MiniOneRec-format dataset with learnable structure")
    s.add_argument("--out", required=True)
    s.add_argument("--users", type=int, default=600)
    s.add_argument("--items", type=int, default=240)
    s.add_argument("--levels", type=int, default=3, help="SID depth (3 or 4)")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_data_synth)
    c = dsub.add_parser("check", help="Validate every file of a dataset directory (file:row: message)")
    c.add_argument("dir")
    c.add_argument("--max-problems", type=POSITIVE, default=50)
    c.set_defaults(fn=cmd_data_check)

    p = sub.add_parser("tokenizer", help="Tokenizer tools")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    tsub.required = True
    b = tsub.add_parser("build", help="Train a small byte-level BPE on a dataset's text, with its SID tokens")
    b.add_argument("--dataset", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--vocab-size", type=POSITIVE, default=512)
    b.set_defaults(fn=cmd_tokenizer_build)

    p = sub.add_parser("metrics", help="HR@K / NDCG@K from eval_predictions.json, as upstream calc.py")
    p.add_argument("--predictions", required=True)
    p.add_argument("--info", required=True, help="info file (SID \\t title \\t item id) or dataset directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(fn=cmd_metrics)

    p = sub.add_parser("export", help="Write a checkpoint as a Hugging Face model directory")
    p.add_argument("--model", required=True, help="run directory or HF directory")
    p.add_argument("--checkpoint", default="", help="tag inside a run directory (default: the first present of rl_last, rl_best, sft_best, sft_last)")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.set_defaults(fn=cmd_export)

    p = sub.add_parser("bench", help="Measure speed; prints one JSON object")
    p.add_argument("what", choices=["eval", "sft", "rollout", "rl"])
    p.add_argument("--shape", default="tiny")
    p.add_argument("--beams", type=POSITIVE, default=50)
    p.add_argument("--batch", type=_int_at_least(0), default=0, help="prompts (eval/rl) or sequences (sft, rollout) per call")
    p.add_argument("--data", default="", help="MiniOneRec dataset directory (eval, rl)")
    p.add_argument("--seq-len", type=POSITIVE, default=512)
    p.add_argument("--prompt-len", type=POSITIVE, default=256)
    p.add_argument("--gen-len", type=POSITIVE, default=512)
    p.add_argument("--fast", default="auto", choices=["auto", "on", "off"], help="rollout fast paths")
    p.add_argument("--iters", type=POSITIVE, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.set_defaults(fn=cmd_bench)

    p = sub.add_parser("baselines", help="Baselines (popularity, item-to-item, SASRec) on a dataset split; table + JSON")
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test")
    p.add_argument("--out", default="", help="write the figures as JSON here")
    p.add_argument("--train-from", default=None,
                   help="split to build training rows from (with prefix windows); default: train when "
                        "train.csv exists, else the split before --split")
    p.add_argument("--select-fraction", type=float, default=0.1,
                   help="last fraction of the training source held out for SASRec early stopping")
    p.add_argument("--seeds", type=int, default=2, help="SASRec seeds 0..N-1 (0 = skip SASRec)")
    p.add_argument("--epochs", type=POSITIVE, default=200, help="SASRec's most epochs (early stopping usually ends sooner)")
    p.set_defaults(fn=cmd_baselines)

    p = sub.add_parser("recipe", help="Run a whole named recipe (tokenizer -> SFT -> RL -> eval -> baselines -> report)")
    p.add_argument("name", choices=["small-cpu"])
    p.add_argument("--data", default="", help="MiniOneRec dataset directory")
    p.add_argument("--out", default="", help="run directory (default runs/small-cpu; with --configs-only: "
                                              "configs/recipes/small-cpu)")
    p.add_argument("--configs-only", action="store_true", help="only write the stage configs and a README")
    p.add_argument("--seed", type=int, default=42, help="seed of the SFT/RL runs")
    p.add_argument("--baseline-seeds", type=int, default=2, help="SASRec seeds 0..N-1 (0 = no SASRec)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="STAGE:key=value",
                   help="a per-stage config override (repeat it), e.g. --set sft:train.steps=100 --set eval:eval.beams=20")
    p.set_defaults(fn=cmd_recipe)
    p = sub.add_parser(
        "launch",
        help="Run a rec command as N local processes (a multi-host run on one machine)",
        description="Run `rec ARGS...` as N local processes joined by jax.distributed, e.g. "
        "rec launch -n 2 --cpu-devices 2 -- sft --config configs/tiny/sft.yaml",
    )
    p.add_argument("-n", "--processes", type=int, default=2)
    p.add_argument("--cpu-devices", type=int, default=0, help="fake CPU devices per process (0 = use the real devices)")
    p.add_argument("--log-dir", default="", help="also write each process's output to LOG_DIR/process_K.log")
    p.add_argument("rec_args", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    p.set_defaults(fn=cmd_launch)

    p = sub.add_parser("handoff", help="Verified checkpoint handoff (no-clobber copy + MANIFEST.json)")
    hsub = p.add_subparsers(dest="handoff_command", metavar="ACTION")
    hsub.required = True
    h = hsub.add_parser("publish", help="Copy a run's checkpoint tag, tokenizer, config and summary to a handoff prefix")
    h.add_argument("--run", required=True, help="run directory (local or gs://)")
    h.add_argument("--to", required=True, help="handoff prefix (local or gs://)")
    h.add_argument("--tag", required=True, help="checkpoint tag, e.g. rl_last")
    h.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest finalised one)")
    h.add_argument("--no-progress", action="store_true")
    h.set_defaults(fn=cmd_handoff_publish)
    h = hsub.add_parser("verify", help="Check a handoff against its MANIFEST.json; print the checkpoint path")
    h.add_argument("prefix")
    h.set_defaults(fn=cmd_handoff_verify)

    p = sub.add_parser("outputs", help="Whether a stage's outputs are finished (run dir, handoff, eval)")
    osub = p.add_subparsers(dest="outputs_command", metavar="ACTION")
    osub.required = True
    for action, text, fn in (("check", "print done or pending", cmd_outputs_check),
                             ("wait", "wait until done", cmd_outputs_wait)):
        o = osub.add_parser(action, help=text)
        o.add_argument("kind", choices=["run", "handoff", "eval"],
                       help="run: COMPLETED.json; handoff: a verified MANIFEST.json; eval: run_summary.json")
        o.add_argument("path", help="run directory, handoff prefix or eval run directory (local or gs://)")
        o.add_argument("--split", default="", help="eval: the split that must have been evaluated")
        if action == "wait":
            o.add_argument("--timeout", default="48h", help="give up after this long (default 48h)")
            o.add_argument("--poll", type=float, default=30.0, help="seconds between checks (default 30)")
            o.add_argument("--start-timeout", default="",
                           help="run: exit 75 if the run has not even started after this long (e.g. 10m)")
        o.set_defaults(fn=fn)
    return parser


def _setup_logging() -> None:
    """rec's own INFO lines (memory estimate, resume, sharding fallbacks) on stderr; other
    libraries stay at their defaults."""
    import logging

    logger = logging.getLogger("rec")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


_USER_ERRNOS = {
    errno.EACCES, errno.EPERM, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EROFS,
    errno.ENAMETOOLONG, errno.ENOTEMPTY,
}


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.fn(args)
    except InputNotStarted as exc:
        print(f"rec: {exc}", file=sys.stderr)
        return EXIT_INPUT_NOT_STARTED
    except RecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return _failed(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        # A path the user gave that cannot be read or written: one line naming it. Exit 2 (a user
        # error, not retried) for what a restart cannot fix; 1 for the rest (a full disk, I/O).
        path = exc.filename2 if exc.filename2 is not None else exc.filename
        if path is None:
            _failed(1, traceback=True)
            raise
        print(f"error: {path}: {exc.strerror or exc}", file=sys.stderr)
        return _failed(2 if exc.errno in _USER_ERRNOS else 1)
    except Exception as exc:
        from rec.dist.preemption import EXIT_CODE, Preempted

        if isinstance(exc, Preempted):
            print(f"rec: {exc}", file=sys.stderr)
            return EXIT_CODE
        exhausted = resource_exhausted(exc)
        if exhausted:  # the same shapes would fail the same way after a restart: say so, exit 3
            print(
                f"error: out of accelerator memory ({exhausted}); lower the batch size "
                "(train.micro_batch_size, eval.batch_size) or the sequence length, or use a larger slice",
                file=sys.stderr,
            )
            return _failed(EXIT_RESOURCE_EXHAUSTED)
        _failed(1, traceback=True)
        raise
    return int(code or 0)


def _failed(code: int, traceback: bool = False) -> int:
    """`code`, or, in a multi-process run, exit at once with it: a failure seen by this process
    alone (a write only process 0 does, say) would otherwise leave it in JAX's shutdown waiting
    for peers that wait for it at their next collective, until a timeout (minutes on TPU). Exiting
    lets `rec launch` or the JobSet stop the others now."""
    dist = sys.modules.get("rec.dist")
    if dist is None or not dist.in_multiprocess_run():
        return code
    if traceback:
        import traceback as tb  # noqa: PLC0415

        tb.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
