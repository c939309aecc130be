"""`rec recipe NAME --data DIR --out RUN`: the whole recipe in one command, or its configs.

`small-cpu` (the only recipe): what a machine with 2 CPU cores runs in under 30 minutes on a real
MiniOneRec dataset (Office_Products): a byte-level BPE built on the catalogue text (`rec tokenizer
build`) -> the `tiny` Qwen2-architecture model from random weights -> SFT on the bare SID sequence (every
position) -> RL (constrained-beam GRPO, ranking reward) from `sft_best` -> constrained beam search on
every test row for SFT and RL -> `rec baselines` on the same training rows -> report.html.
Training rows: `data.train_from=valid` when the dataset has no train.csv (every valid row plus the
prefix windows of its history; the last 10% held out for selection). Every selection (sft_best,
rl_best, SASRec early stopping) uses that held-out slice, never the evaluated split.
The choices and what each did are in docs/RECIPE.md.

RUN holds: configs/{sft,rl,eval}.yaml (+ README.md with the equivalent commands), tokenizer/,
sft/ and rl/ (run directories, each with its own eval_predictions.json and run_summary.json),
baselines.json, and at the top the usual run-directory files: run_summary.json (`eval/*` of the
final RL model, plus `sft/eval/*` and `baselines/<name>/*`), eval_predictions.json (RL),
report.html (SFT, RL and the baselines side by side). A rerun on the same RUN resumes.

`configs_only=True` (CLI `--configs-only`) writes only the configs and README, as before.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

import yaml

from rec import storage
from rec.config import load_config
from rec.errors import RecError
from rec.storage.outputs import mark_completed

RECIPES = ("small-cpu",)


# The small-cpu recipe's knobs (docs/RECIPE.md says what each choice did on Office_Products).
SMALL_CPU = {
    "tokenizer_vocab": 512,  # BPE merges on the catalogue text; the SID tokens come on top
    "shape": "tiny",  # Qwen2 architecture: hidden 64, 2 layers, 4 heads (2 KV), tied embeddings
    # the bare SID sequence, every history position trained (rec/data/prompts.py sid_sequence);
    # generation continues the history ("sequence" prompts) in RL and eval
    "tasks": ["sid_sequence"],
    "prompt": "sequence",
    "sft_steps": 1000,  # ~34 epochs of the 1.9k longest Office sequences; sft_best is picked on the selection slice
    "sft_batch": 64,
    "sft_lr": 3e-3,
    "sft_weight_decay": 0.1,
    "sft_dropout": 0.1,
    "sft_eval_every": 50,
    "length_buckets": [24, 40, 56],  # sequences are 15-50 tokens with their target
    "rl_steps": 100,
    "rl_batch": 16,
    "rl_generations": 16,  # 8 beams sharpened the top (HR@1 up) but lost HR@10 on the selection slice
    "rl_lr": 1e-4,
    "rl_beta": 1e-3,
    "rl_eval_every": 25,
    "eval_beams": 50,
}


def _has_train(data_dir: str) -> bool:
    return storage.exists(storage.join(data_dir, "train.csv"))


def _small_cpu(data_dir: str, runs: str, seed: int = 42) -> dict[str, dict]:
    k = SMALL_CPU
    tokenizer_dir = f"{runs}/tokenizer"
    sft_dir, rl_dir = f"{runs}/sft", f"{runs}/rl"
    # The public snapshot has no train.csv: train on the valid rows plus the prefix windows of their
    # histories; the last 10% of valid rows are held out for every selection (never the test split).
    data_rows = {"train_split": "train"} if _has_train(data_dir) else {"train_from": "valid", "select_fraction": 0.1}
    common_model = {"shape": k["shape"], "tokenizer": tokenizer_dir, "param_dtype": "float32",
                    "compute_dtype": "float32", "remat": False}
    sft = {
        "run": {"dir": sft_dir, "seed": seed, "wandb_mode": "offline"},
        "model": {"path": "", **common_model},
        "data": {
            "dir": data_dir,
            **data_rows,
            "valid_split": "valid",
            "split": "test",
            "tasks": list(k["tasks"]),
            "max_len": 64,
            "length_buckets": list(k["length_buckets"]),
        },
        "mesh": {"shape": "auto"},
        "train": {
            "batch_size": k["sft_batch"],
            "steps": k["sft_steps"],
            "lr": k["sft_lr"],
            "schedule": "cosine",
            "warmup_steps": 50,
            "min_lr_ratio": 0.05,
            "weight_decay": k["sft_weight_decay"],
            "dropout": k["sft_dropout"],
            "eval_every": k["sft_eval_every"],
            "eval_limit": -1,
            # sft_best is picked by validation loss on the held-out slice; no early stop on the
            # early plateau a small model sits on before it learns the sequences
            "early_stopping_patience": 0,
        },
    }
    rl = {
        "run": {"dir": rl_dir, "seed": seed, "wandb_mode": "offline"},
        "model": {"path": sft_dir, "checkpoint": "sft_best", **common_model},
        "data": {"dir": data_dir, **data_rows, "valid_split": "valid", "split": "test", "max_len": 64,
                 "length_buckets": list(k["length_buckets"])},
        "mesh": {"shape": "auto"},
        "train": {"batch_size": k["rl_batch"], "steps": k["rl_steps"], "lr": k["rl_lr"], "schedule": "cosine",
                  "warmup_ratio": 0.03, "warmup_steps": 0, "grad_clip": 0.3},
        "eval": {"batch_size": 16, "prompt": k["prompt"]},
        "rl": {"generations": k["rl_generations"], "reward": "ranking", "beta": k["rl_beta"],
               "tasks": list(k["tasks"]), "ref_sync_every": 0, "eval_every": k["rl_eval_every"],
               "eval_beams": 20, "eval_limit": -1, "best_metric": "ndcg@10"},
    }
    evaluation = {
        "run": {"dir": rl_dir},
        "model": {"path": rl_dir, "checkpoint": "rl_best", **common_model},
        "data": {"dir": data_dir, **data_rows, "split": "test"},
        "mesh": {"shape": "auto"},
        "eval": {"beams": k["eval_beams"], "batch_size": 16, "limit": -1, "prompt": k["prompt"]},
    }
    return {"sft": sft, "rl": rl, "eval": evaluation}


README_TITLE = "# small-cpu recipe\n"


def _readme(out: str, data_dir: str, runs: str, have_train: bool, overrides: dict[str, list[str]] | None = None) -> str:
    def extra(stage: str) -> str:
        return "".join(f" {o}" for o in (overrides or {}).get(stage, []))

    rows = (
        "These configs train on the dataset's `train.csv` and select on its valid split."
        if have_train
        else "This dataset has no `train.csv` (the public snapshot ships only valid/test), so the configs "
        "train on the valid split's rows and prefix windows (`data.train_from=valid`) and select on its "
        "last 10%."
    )
    used = "".join(f"\n- {stage}: `{' '.join(items)}`" for stage, items in (overrides or {}).items() if items)
    used = f"\n\nThe run used these overrides (included in the commands above):{used}\n" if used else "\n"
    return README_TITLE + f"""
`rec recipe small-cpu --data {data_dir} --out {runs}` runs all of this in one command; by hand:

```bash
rec tokenizer build --dataset {data_dir} --out {runs}/tokenizer --vocab-size {SMALL_CPU["tokenizer_vocab"]}
rec sft  --config {out}/sft.yaml{extra("sft")}
rec rl   --config {out}/rl.yaml{extra("rl")}
rec eval --config {out}/eval.yaml{extra("eval")}          # HR@K / NDCG@K of rl_best on every test row
rec eval --config {out}/eval.yaml{extra("eval")} model.path={runs}/sft model.checkpoint=sft_best run.dir={runs}/sft
rec baselines --data {data_dir} --split test --out {runs}/baselines.json
```

{rows}{used}"""


def _validated_texts(name: str, data_dir: str, runs: str, seed: int = 42) -> dict[str, str]:
    """YAML text per stage, each checked with `load_config` before anything is written."""
    if name not in RECIPES:
        raise RecError(f"recipe: unknown name {name!r} (choose from {', '.join(RECIPES)})")
    configs = _small_cpu(str(data_dir), runs, seed)
    texts = {stage: yaml.safe_dump(cfg, sort_keys=False) for stage, cfg in configs.items()}
    with tempfile.TemporaryDirectory(prefix="rec-recipe-") as scratch:
        for stage, text in texts.items():
            path = os.path.join(scratch, f"{stage}.yaml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            load_config(path)
    return texts


def _is_recipe_configs(path: str) -> bool:
    """Whether `path` holds configs this module wrote (its README says so)."""
    readme = storage.join(path, "README.md")
    return storage.exists(readme) and storage.read_text(readme).startswith(README_TITLE)


def write_recipe(name: str, out: str, data_dir: str, runs_dir: str = "", seed: int = 42,
                 overrides: dict[str, list[str]] | None = None) -> str:
    """Write the recipe's configs under `out` (a new directory or earlier recipe configs); every
    file is checked with `load_config` first. `overrides`: the per-stage ones a run used, listed in
    the README's commands."""
    if not data_dir:
        raise RecError("--data: the configs name the dataset and how it is split; give its directory")
    storage.refuse_foreign_output(out, "--out", _is_recipe_configs, "set of recipe configs")
    runs = runs_dir or "runs/small-cpu"
    texts = _validated_texts(name, str(data_dir), runs, seed)
    for stage, text in texts.items():
        header = f"# rec recipe {name}: {stage} stage (see README.md in this directory)\n"
        storage.write_text(storage.join(out, f"{stage}.yaml"), header + text)
    readme = _readme(out, str(data_dir), runs, _has_train(str(data_dir)), overrides)
    storage.write_text(storage.join(out, "README.md"), readme)
    return out


# ---------------------------------------------------------------------------------------------
# Running it

MARKER = ".rec-recipe"
STAGE_OVERRIDES = ("sft", "rl", "eval")


def parse_stage_overrides(items) -> dict[str, list[str]]:
    """["sft:train.steps=20", "rl:train.steps=2"] -> {"sft": [...], "rl": [...], "eval": []}."""
    out: dict[str, list[str]] = {stage: [] for stage in STAGE_OVERRIDES}
    for item in items or []:
        stage, sep, override = str(item).partition(":")
        if not sep or stage not in out or "=" not in override:
            raise RecError(f"recipe override {item!r}: expected STAGE:key=value with STAGE one of "
                           f"{', '.join(STAGE_OVERRIDES)} (e.g. sft:train.steps=100)")
        out[stage].append(override)
    return out


def _prepare_out(out: str, identity: str) -> None:
    """`out` must be new, empty, or an earlier run of the same recipe on the same data and seed:
    a rerun resumes its stages, so other arguments would mix two runs under one report."""
    if storage.is_gcs(out):
        raise RecError(f"--out {out}: the recipe writes to a local directory")
    marker = os.path.join(out, MARKER)
    storage.refuse_foreign_output(out, "--out", lambda p: os.path.exists(os.path.join(p, MARKER)), "recipe run")
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            earlier = f.read().splitlines()[1:]
        if earlier and earlier != identity.splitlines():
            raise RecError(
                f"--out {out}: holds a recipe run with other arguments ({'; '.join(earlier)}); a rerun "
                "resumes it, so use the same arguments or another --out"
            )
    os.makedirs(out, exist_ok=True)
    with open(marker, "w", encoding="utf-8") as f:
        f.write("rec recipe output; a rerun with the same --out and arguments resumes the stages\n" + identity)


def run_recipe(name: str, data_dir: str, out: str, seed: int = 42, overrides=None, baseline_seeds=(0, 1),
               progress: bool = True) -> dict:
    """Run every stage of the recipe into `out`; returns the top-level run_summary figures."""
    import json  # noqa: PLC0415
    import sys  # noqa: PLC0415
    import time  # noqa: PLC0415

    from rec.data.dataset import available_splits  # noqa: PLC0415
    from rec.demo import _banner  # noqa: PLC0415

    if not data_dir:
        raise RecError("--data: a MiniOneRec dataset directory is needed to run the recipe")
    if "test" not in available_splits(data_dir):
        raise RecError(f"{data_dir}: no test.csv to evaluate on")
    stage_overrides = parse_stage_overrides(overrides)
    user_overrides = {stage: list(items) for stage, items in stage_overrides.items()}
    if not progress:
        for stage in STAGE_OVERRIDES:
            stage_overrides[stage].insert(0, "run.progress=false")
    os.environ.setdefault("WANDB_SILENT", "true")
    configs_dir = os.path.join(out, "configs")
    texts = _validated_texts(name, str(data_dir), out, seed)  # before anything is written
    cfgs = {}
    with tempfile.TemporaryDirectory(prefix="rec-recipe-") as scratch:
        for stage, text in texts.items():
            path = os.path.join(scratch, f"{stage}.yaml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            cfgs[stage] = load_config(path, stage_overrides[stage])
    _prepare_out(out, f"recipe {name}\ndata {os.path.abspath(str(data_dir))}\nseed {seed}\n")
    write_recipe(name, configs_dir, data_dir=str(data_dir), runs_dir=out, seed=seed, overrides=user_overrides)

    from rec.eval.baselines import run_baselines  # noqa: PLC0415
    from rec.eval.evaluate import run_eval  # noqa: PLC0415
    from rec.eval.report import write_report  # noqa: PLC0415
    from rec.tokenizer import build_tokenizer  # noqa: PLC0415
    from rec.train.rl import run_rl  # noqa: PLC0415
    from rec.train.sft import run_sft  # noqa: PLC0415

    started = time.perf_counter()
    total = 6
    sft_cfg, rl_cfg, eval_cfg = cfgs["sft"], cfgs["rl"], cfgs["eval"]
    tokenizer_dir = sft_cfg.model.tokenizer
    timings: dict[str, float] = {}

    def timed(key, fn, *args, **kwargs):
        t0 = time.perf_counter()
        result = fn(*args, **kwargs)
        timings[key] = round(time.perf_counter() - t0, 1)
        return result

    _banner(1, total, f"tokenizer: byte-level BPE ({SMALL_CPU['tokenizer_vocab']}) on the catalogue text -> {tokenizer_dir}")
    if not os.path.exists(os.path.join(tokenizer_dir, "tokenizer_config.json")):
        timed("tokenizer_s", build_tokenizer, data_dir, tokenizer_dir, vocab_size=SMALL_CPU["tokenizer_vocab"])
    _banner(2, total, f"SFT {sft_cfg.model.shape} model from scratch, tasks {sft_cfg.data.tasks}, "
                      f"{sft_cfg.train.steps} steps -> {sft_cfg.run.dir}")
    timed("sft_s", run_sft, sft_cfg)
    mark_completed(sft_cfg.run.dir, "sft")
    _banner(3, total, f"RL from sft_best, {rl_cfg.train.steps} steps x {rl_cfg.train.batch_size} prompts x "
                      f"{rl_cfg.rl.generations} beams, beta {rl_cfg.rl.beta} -> {rl_cfg.run.dir}")
    timed("rl_s", run_rl, rl_cfg)
    mark_completed(rl_cfg.run.dir, "rl")
    _banner(4, total, f"evaluate SFT (sft_best) and RL ({eval_cfg.model.checkpoint}) on every "
                      f"{eval_cfg.data.split} row, {eval_cfg.eval.beams} beams")
    sft_eval = dataclasses.replace(eval_cfg, run=dataclasses.replace(eval_cfg.run, dir=sft_cfg.run.dir),
                                   model=dataclasses.replace(eval_cfg.model, path=sft_cfg.run.dir, checkpoint="sft_best"))
    sft_figures = timed("eval_sft_s", run_eval, sft_eval)
    rl_figures = timed("eval_rl_s", run_eval, eval_cfg)
    baselines_path = os.path.join(out, "baselines.json")
    _banner(5, total, f"baselines (popularity, transition, SASRec x {len(baseline_seeds)} seeds) on the same rows "
                      f"-> {baselines_path}")
    baselines = timed("baselines_s", run_baselines, data_dir, split=eval_cfg.data.split, out=baselines_path,
                      k=eval_cfg.eval.beams, echo=False, train_from=sft_cfg.data.train_from or "",
                      select_fraction=sft_cfg.data.select_fraction, seeds=list(baseline_seeds), progress=progress)
    _banner(6, total, "run summary, predictions and report")
    summary = {k: v for k, v in rl_figures.items() if k.startswith("eval/")}
    summary.update({f"sft/{k}": v for k, v in sft_figures.items() if k.startswith("eval/")})
    for method, figures in baselines.items():
        summary.update({f"baselines/{method}/{k}": v for k, v in figures.items() if "@" in k})
    summary.update({"recipe/name": name, "recipe/seed": seed, "recipe/rl_checkpoint": eval_cfg.model.checkpoint,
                    "recipe/train_from": sft_cfg.data.train_from or sft_cfg.data.train_split,
                    **{f"recipe/{k}": v for k, v in timings.items()}})
    summary["recipe/total_s"] = round(time.perf_counter() - started, 1)
    storage.write_text(os.path.join(out, "eval_predictions.json"),
                       storage.read_text(os.path.join(eval_cfg.run.dir, "eval_predictions.json")))
    storage.write_text(os.path.join(out, "run_summary.json"), json.dumps(summary, indent=2, sort_keys=True) + "\n")
    report = write_report([sft_cfg.run.dir, eval_cfg.run.dir], os.path.join(out, "report.html"), labels=["SFT", "RL"],
                          title=f"rec recipe {name}: {os.path.basename(str(data_dir).rstrip('/'))}", baselines=baselines)
    rows = [("SFT", sft_figures), ("RL", rl_figures)] + [(m, {f"eval/{k}": v for k, v in f.items()}) for m, f in baselines.items()]
    print(f"\nrecipe finished in {summary['recipe/total_s']:.0f} s ({eval_cfg.data.split} split):", file=sys.stderr)
    for label, figures in rows:
        print(f"  {label:<11} HR@10 {figures.get('eval/hr@10', float('nan')):.4f}  "
              f"NDCG@10 {figures.get('eval/ndcg@10', float('nan')):.4f}", file=sys.stderr)
    print(report)
    return summary
