"""`rec recipe NAME`: write a ready, validated set of configs for a named setting.

`small-cpu`: what a user without an accelerator can run in about an hour on a real MiniOneRec
dataset directory (e.g. Office_Products): a small byte-level BPE built on the dataset, the `tiny`
model shape from random weights, a short SFT on the task mixture, a short RL stage, and a 20-beam
eval of every test row. It will not reach the paper's numbers (that needs Qwen2.5 weights and a TPU
slice); it shows the whole recipe working end to end, well above the popularity baseline.

Files written under OUT: `sft.yaml`, `rl.yaml`, `eval.yaml` (each loads with `load_config`) and
`README.md` with the commands in order. The dataset directory and run directories are written into
the configs; pass `data_dir` (CLI `--data`) or override `data.dir=...` on each command.
"""

from __future__ import annotations

import os
import tempfile

import yaml

from rec import storage
from rec.config import load_config
from rec.errors import RecError

RECIPES = ("small-cpu",)


def _small_cpu(data_dir: str, runs: str) -> dict[str, dict]:
    tokenizer_dir = f"{runs}/tokenizer"
    sft_dir, rl_dir = f"{runs}/sft", f"{runs}/rl"
    have_train = bool(data_dir) and storage.exists(storage.join(data_dir, "train.csv"))
    # The shared snapshot has no train.csv: train on valid, validate on a slice of it (flagged in README).
    train_split = "train" if have_train or not data_dir else "valid"
    common_model = {"shape": "tiny", "tokenizer": tokenizer_dir, "param_dtype": "float32", "compute_dtype": "float32"}
    sft = {
        "run": {"dir": sft_dir, "seed": 42, "wandb_mode": "offline"},
        "model": {"path": "", **common_model, "remat": False},
        "data": {
            "dir": data_dir,
            "train_split": train_split,
            "valid_split": "valid",
            "max_len": 256,
            "length_buckets": [64, 128, 256],
        },
        "mesh": {"shape": "auto"},
        "train": {
            "batch_size": 64,
            # ~5 epochs of the mixture built from Office's valid split (26k examples), ~25 min on 2 cores
            "steps": 2000,
            "lr": 3e-3,
            "schedule": "cosine",
            "warmup_steps": 50,
            "min_lr_ratio": 0.1,
            "eval_every": 200,
            "eval_limit": 512,
            # A tiny model sits on a "format only" plateau (valid loss flat) for epochs before it
            # learns the sequences; early stopping would end the run there. sft_best still picks by loss.
            "early_stopping_patience": 0,
        },
    }
    rl = {
        "run": {"dir": rl_dir, "seed": 42, "wandb_mode": "offline"},
        "model": {"path": sft_dir, "checkpoint": "sft_best", **common_model, "remat": False},
        "data": {"dir": data_dir, "train_split": train_split, "valid_split": "valid", "max_len": 256},
        "mesh": {"shape": "auto"},
        "train": {"batch_size": 16, "steps": 200, "lr": 1e-4, "schedule": "cosine", "warmup_ratio": 0.03, "warmup_steps": 0},
        "rl": {"generations": 8, "reward": "ranking", "beta": 1e-3, "eval_beams": 10, "eval_limit": 256},
    }
    evaluation = {
        "run": {"dir": rl_dir},
        "model": {"path": rl_dir, "checkpoint": "rl_last", **common_model},
        "data": {"dir": data_dir, "split": "test"},
        "mesh": {"shape": "auto"},
        "eval": {"beams": 20, "batch_size": 16, "limit": -1, "prompt": "eval"},
    }
    return {"sft": sft, "rl": rl, "eval": evaluation}


def _readme(out: str, data_dir: str, runs: str) -> str:
    data = data_dir or "DATASET_DIR"
    return f"""# small-cpu recipe

A complete MiniOneRec run on CPU in about an hour: tiny model, small BPE built on the dataset.
Dataset: `{data}`; runs go under `{runs}/`.

```bash
rec tokenizer build --dataset {data} --out {runs}/tokenizer
rec sft  --config {out}/sft.yaml
rec rl   --config {out}/rl.yaml
rec eval --config {out}/eval.yaml          # HR@K / NDCG@K of rl_last on every test row
rec eval --config {out}/eval.yaml model.path={runs}/sft model.checkpoint=sft_best run.dir={runs}/sft
rec baselines --data {data} --out {runs}/baselines.json
```

Without a `train.csv` (the public snapshot ships only valid/test) the configs train on the valid
split; compare the eval numbers with the baselines, not with the paper.
"""


def write_recipe(name: str, out: str, data_dir: str = "", runs_dir: str = "") -> str:
    """Write the recipe's configs under `out`; every file is checked with `load_config` first."""
    if name not in RECIPES:
        raise RecError(f"recipe: unknown name {name!r} (choose from {', '.join(RECIPES)})")
    runs = runs_dir or "runs/small-cpu"
    configs = _small_cpu(str(data_dir), runs)
    texts = {stage: yaml.safe_dump(cfg, sort_keys=False) for stage, cfg in configs.items()}
    # Validate everything before writing anything: a recipe is either complete or absent.
    with tempfile.TemporaryDirectory(prefix="rec-recipe-") as scratch:
        for stage, text in texts.items():
            path = os.path.join(scratch, f"{stage}.yaml")
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            load_config(path)
    for stage, text in texts.items():
        header = f"# rec recipe {name}: {stage} stage (see README.md in this directory)\n"
        storage.write_text(storage.join(out, f"{stage}.yaml"), header + text)
    storage.write_text(storage.join(out, "README.md"), _readme(out, str(data_dir), runs))
    return out
