"""`rec demo` / `make demo`: the whole pipeline on generated data, on CPU, in a few minutes.

Stages (each announced with a banner on stderr, each with its own progress bars):
1. synthesize a MiniOneRec-format dataset with learnable structure (rec.data.synth);
2. build a small byte-level BPE tokenizer on it, SID tokens added (rec.tokenizer);
3. SFT a tiny random-init Qwen2-shaped model (configs/tiny/sft.yaml) on the next-SID task only:
   measured on this data, a 2-layer model needs about three epochs of next-SID rows to get past the
   "right format, item marginals only" plateau (valid loss ~1.1 = chance HR@10); with the full
   five-task mixture a few minutes of CPU give under one such epoch and chance-level HR, so the demo
   trains the task it evaluates (the mixture is what configs/sft/*.yaml and `rec recipe` use);
4. RL from the SFT's best checkpoint (configs/tiny/rl.yaml), unless rl=False;
5. evaluate SFT and RL with constrained beam search on every test row (configs/tiny/eval.yaml),
   plus the popularity / item-to-item / SASRec baselines;
6. write report.html and print its path (stdout, last line).

Layout under `out`: data/, tokenizer/, sft/, rl/ (run directories with their own
eval_predictions.json and run_summary.json), baselines.json, report.html. A `.rec-demo` marker
lets a second `rec demo --out` on the same directory start over; any other non-empty directory is
refused rather than overwritten.

`quick=True` (tests) uses a smaller dataset and fewer steps: same code path, under two minutes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

from rec import storage
from rec.errors import RecError
from rec.storage.outputs import mark_completed

MARKER = ".rec-demo"
# Inside the package (rec/configs links to the checkout's configs/), so an installed wheel has them.
CONFIGS = Path(__file__).resolve().parent / "configs" / "tiny"

# (users, items) of the synthetic dataset; SFT / RL steps. Full: chance HR@10 = 10/240 ≈ 4%.
FULL = {"users": 600, "items": 240, "sft_steps": 450, "rl_steps": 40, "eval_beams": 20}
QUICK = {"users": 150, "items": 48, "sft_steps": 40, "rl_steps": 4, "eval_beams": 10}


def _banner(index: int, total: int, text: str) -> None:
    print(f"\n== [{index}/{total}] {text}", file=sys.stderr, flush=True)


def _prepare_out(out: str) -> None:
    if storage.is_gcs(out):
        raise RecError(f"--out {out}: the demo writes to a local directory")
    path = Path(out)
    storage.refuse_foreign_output(out, "--out", lambda p: os.path.exists(os.path.join(p, MARKER)), "demo output")
    if path.exists():
        for name in ("data", "tokenizer", "sft", "rl", "baselines.json", "report.html"):
            target = path / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
    path.mkdir(parents=True, exist_ok=True)
    (path / MARKER).write_text("rec demo output; `rec demo` may delete and rewrite this directory\n")


def _config(name: str, overrides: list[str]):
    from rec.config import load_config

    return load_config(str(CONFIGS / name), overrides)


def run_demo(out: str = "runs/demo", rl: bool = True, quick: bool = False) -> str:
    """Run every stage; return (and print) the report path."""
    from rec.data.synth import synthesize
    from rec.eval.baselines import run_baselines
    from rec.eval.evaluate import run_eval
    from rec.eval.report import write_report
    from rec.tokenizer import build_tokenizer
    from rec.train.sft import run_sft

    settings = QUICK if quick else FULL
    os.environ.setdefault("WANDB_SILENT", "true")  # offline W&B runs stay quiet; metrics.jsonl has the same figures
    rl = rl and _rl_available()
    total = 6 if rl else 5
    started = time.perf_counter()
    _prepare_out(out)
    data_dir, tokenizer_dir = os.path.join(out, "data"), os.path.join(out, "tokenizer")
    sft_dir, rl_dir = os.path.join(out, "sft"), os.path.join(out, "rl")
    stage = 0

    stage += 1
    _banner(stage, total, f"synthesize a dataset ({settings['users']} users, {settings['items']} items) -> {data_dir}")
    synthesize(data_dir, users=settings["users"], items=settings["items"], seed=0, levels=3)

    stage += 1
    _banner(stage, total, f"build a byte-level BPE tokenizer with the SID tokens -> {tokenizer_dir}")
    build_tokenizer(data_dir, tokenizer_dir, vocab_size=512)

    stage += 1
    _banner(stage, total, f"SFT a tiny Qwen2-shaped model on next-SID ({settings['sft_steps']} steps) -> {sft_dir}")
    common = [f"data.dir={data_dir}", "run.resume=false"]
    run_sft(_config("sft.yaml", [*common, f"model.tokenizer={tokenizer_dir}", f"run.dir={sft_dir}",
                                 f"train.steps={settings['sft_steps']}", "data.tasks=[sid_next]",
                                 # the plateau above would trip early stopping; sft_best still picks by val loss
                                 "train.early_stopping_patience=0"]))
    mark_completed(sft_dir, "sft")  # as `rec sft` does: `rec rl model.path=<this run>` accepts it

    if rl:
        from rec.train.rl import run_rl

        stage += 1
        _banner(stage, total, f"RL (GRPO with constrained-beam rollouts, {settings['rl_steps']} steps) -> {rl_dir}")
        run_rl(_config("rl.yaml", [*common, f"model.path={sft_dir}", "model.checkpoint=sft_best",
                                   f"run.dir={rl_dir}", f"train.steps={settings['rl_steps']}"]))
        mark_completed(rl_dir, "rl")

    stage += 1
    evaluated = [("SFT (sft_best)", sft_dir, "sft_best")] + ([("RL (rl_last)", rl_dir, "rl_last")] if rl else [])
    _banner(stage, total, "evaluate " + " and ".join(name for name, _, _ in evaluated) + " on every test row, "
                          "then the baselines (popularity, transition, SASRec)")
    beams = settings["eval_beams"]
    for _, run_dir, tag in evaluated:
        run_eval(_config("eval.yaml", [f"data.dir={data_dir}", f"model.path={run_dir}", f"model.checkpoint={tag}",
                                       f"run.dir={run_dir}", f"eval.beams={beams}"]))
    baselines_path = os.path.join(out, "baselines.json")
    from rec.eval.sasrec import SASRecConfig

    # popularity, transition and SASRec (2 seeds; 1 short one in quick mode) on the SFT's training rows
    run_baselines(data_dir, split="test", out=baselines_path, k=beams, echo=False, seeds=(0,) if quick else (0, 1),
                  sasrec_cfg=SASRecConfig(max_epochs=10) if quick else None)

    stage += 1
    report_path = os.path.join(out, "report.html")
    _banner(stage, total, f"write the report -> {report_path}")
    write_report([run_dir for _, run_dir, _ in evaluated], report_path, labels=["sft", "rl"][: len(evaluated)],
                 title="rec demo: MiniOneRec recipe on synthetic data",
                 baselines=json.loads(Path(baselines_path).read_text()))
    # Chance: a random ranking of the catalogue puts the target in the top 10 with p = 10 / items.
    hr10 = ", ".join(
        f"{label} {json.loads(Path(run_dir, 'run_summary.json').read_text())['eval/hr@10']:.3f}"
        for label, (_, run_dir, _) in zip(["SFT", "RL"], evaluated, strict=False)
    )
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s; HR@10: {hr10} "
          f"(chance {10 / settings['items']:.3f}); report:", file=sys.stderr)
    print(report_path)
    return report_path


def _rl_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("rec.train.rl") is not None
