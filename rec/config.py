"""One typed config for every stage (SFT, RL, eval, GSM8K GRPO).

A run config is a YAML file whose top-level sections match the dataclasses below, plus dotted
overrides from the command line (`train.steps=100 run.dir=gs://b/runs/x`). Unknown keys, wrong
value types and unparsable values are `RecError`s that name the key and the file.

Sections are shared by all stages on purpose: `train.*` drives the optimizer of SFT, RL and GRPO
alike (what "batch" means per stage is documented on the field), `mesh.*` the sharding, `run.*`
the output location and logging.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import pathlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from rec.errors import RecError


@dataclass
class RunConfig:
    dir: str = "runs/default"  # local path or gs://bucket/prefix; config.yaml, metrics, checkpoints go here
    seed: int = 42
    wandb_project: str = "rec"
    wandb_mode: str = "auto"  # auto: online when WANDB_API_KEY is set, else offline; or online|offline|disabled
    progress: bool = True  # progress bars on stderr
    resume: bool = True  # continue from the newest checkpoint in run.dir if there is one


@dataclass
class ModelConfig:
    # A Hugging Face model directory, or a run directory (then `checkpoint` picks the tag), or ""
    # to start from random weights of `shape` (tests, benchmarks, the demo).
    path: str = ""
    checkpoint: str = ""  # tag inside a run directory; "" = the stage's default (sft_best for rl/eval)
    shape: str = "tiny"  # named shape for random init: tiny | mini | qwen2.5-0.5b | qwen2.5-1.5b | qwen2.5-3b | qwen2.5-7b
    tokenizer: str = ""  # tokenizer directory; "" = the model directory (or the run's tokenizer/)
    param_dtype: str = "float32"  # float32 | bfloat16
    compute_dtype: str = "bfloat16"  # float32 | bfloat16
    remat: bool = True  # rematerialise layer activations in training
    vocab_multiple: int = 128  # pad the embedding rows to a multiple (sharding, MXU tiles)


@dataclass
class DataConfig:
    dir: str = ""  # MiniOneRec dataset directory (local or gs://); GSM8K directory for grpo
    split: str = "test"  # split evaluated by `rec eval`: test | valid
    train_split: str = "train"  # split used for training rows (valid when train.csv is not available)
    valid_split: str = "valid"  # split used for validation loss / periodic RL validation
    # Build training rows from an earlier split (e.g. "valid" when there is no train.csv): every row
    # plus every prefix window of its history, de-duplicated (rec/data/windows.py). "" = train_split.
    # Must differ from `split`. Then model selection uses the held-out slice below, not valid_split.
    train_from: str = ""
    select_fraction: float = 0.1  # with train_from: the last fraction of its rows, held out for selection
    category: str = ""  # phrase used in prompts; "" = derived from the directory name
    max_len: int = 512  # left truncation of SFT sequences
    # SFT task mixture, upstream names: sid_next (SidSFTDataset), sid_item_feat (SidItemFeatDataset),
    # fusion_seq_rec (FusionSeqRecDataset), title_history (SFTData), title_history_sid
    # (TitleHistory2SidSFTDataset)
    tasks: list[str] = field(
        default_factory=lambda: ["sid_next", "sid_item_feat", "fusion_seq_rec", "title_history", "title_history_sid"]
    )
    limit: int = -1  # use only the first N rows of each split (-1 = all)
    length_buckets: list[int] = field(default_factory=lambda: [64, 128, 256, 512])


@dataclass
class MeshConfig:
    # "auto": all devices on fsdp (full-device FSDP measured fastest on v6e-16), or "D,F,T" with -1 = fill.
    shape: str = "auto"
    # Memory per chip in GiB for the pre-flight estimate; 0 = ask the device (TPU/GPU report it;
    # on CPU nothing is refused). Set it to check a config for a slice you are not on.
    memory_per_chip_gib: float = 0.0


@dataclass
class TrainConfig:
    # SFT: sequences per optimizer step. RL and GRPO: prompts per optimizer step.
    batch_size: int = 1024
    micro_batch_size: int = 0  # per forward/backward pass (same unit as batch_size); 0 = batch_size
    steps: int = 0  # optimizer steps; 0 = derived from epochs
    epochs: float = 10.0
    lr: float = 3e-4
    schedule: str = "linear"  # linear | cosine | constant (after warmup)
    warmup_steps: int = 20
    warmup_ratio: float = 0.0  # used when warmup_steps is 0
    min_lr_ratio: float = 0.0  # floor of the decay as a fraction of lr
    weight_decay: float = 0.0
    dropout: float = 0.0  # SFT only: residual dropout in the Qwen2 forward (rec.model.qwen2.forward)
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip: float = 1.0  # global-norm clip; 0 = off
    eval_every: int = 0  # steps between validations; 0 = every 5% of the run
    eval_limit: int = -1  # validation rows used (-1 = all)
    early_stopping_patience: int = 3  # validations without improvement before stopping; 0 = never
    # SFT: what picks sft_best (and drives early stopping): "" = validation loss; hr@K / ndcg@K =
    # constrained beam search with `eval_beams` beams on the validation rows (eval.prompt wording)
    best_metric: str = ""
    eval_beams: int = 20
    log_every: int = 1


@dataclass
class CheckpointConfig:
    every_steps: int = 0  # steps between resumable checkpoints (sft_last/rl_last/grpo_last); 0 = at each validation
    keep: int = 2  # newest steps kept of each resumable tag (the best-model tags keep one)
    async_save: bool = True  # write in the background while training continues


@dataclass
class EvalConfig:
    beams: int = 50
    batch_size: int = 8  # prompts per decode call
    topk: list[int] = field(default_factory=lambda: [1, 3, 5, 10, 20, 50])
    limit: int = -1  # evaluate only the first N rows (-1 = all rows of the split)
    prompt: str = "eval"  # eval: upstream evaluate.py wording; sft: the SFT next-SID wording; compact: sid_next_compact; sequence: sid_sequence


@dataclass
class RLConfig:
    generations: int = 16  # beams per prompt (G)
    reward: str = "ranking"  # rule | ranking | ranking_only
    reward_weights: list[float] = field(default_factory=list)  # one per reward term; [] = all 1.0
    beta: float = 1e-3  # k3 KL weight
    updates_per_batch: int = 1  # >1 turns on PPO-style ratio clipping
    clip_eps: float = 0.2
    ref_sync_every: int = 512  # 0 = never sync the reference
    ref_sync_alpha: float = 0.6
    tasks: list[str] = field(default_factory=lambda: ["sid_next", "title2sid", "seq_title2sid"])
    seq_title_sample: int = 10000
    eval_every: int = 0  # steps between validation HR/NDCG; 0 = every 10% of the run
    eval_beams: int = 20
    eval_limit: int = 512
    best_metric: str = ""  # e.g. "hr@10": also keep rl_best by validation


@dataclass
class GRPOConfig:
    generations: int = 8  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 512
    max_prompt_len: int = 256
    estimator: str = "grpo"  # grpo | rloo
    clip_low: float = 0.2
    clip_high: float = 0.3
    beta: float = 0.0
    updates_per_batch: int = 1
    reward_weights: list[float] = field(default_factory=lambda: [1.0, 0.5])  # correctness, format
    # "auto" = on unless the environment sets ROLLOUT_FAST_GENERATE / ROLLOUT_FAST_QWEN2_DECODE_ATTENTION to 0
    fast_generate: str = "auto"
    fast_decode_attention: str = "auto"
    eval_split: str = "test"
    eval_limit: int = 256
    eval_every: int = 0
    synthetic: int = 0  # >0: use N generated arithmetic problems instead of data.dir (demo, CI)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one value against a field type; errors name `where`."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise RecError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise RecError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # YAML 1.1 reads "3e-3" (no dot) as a string; accept any float literal.
            try:
                value = float(value.strip())
            except ValueError:
                raise RecError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if value is None:
            return ""
        if isinstance(value, (dict, list)):
            raise RecError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, typing.List):  # noqa: UP006
        (inner,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool) and inner is not str:
            value = [value]
        if isinstance(value, str) and inner is str:
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise RecError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        raise RecError(f"{where}: unsupported union type")  # not used in the schema
    raise RecError(f"{where}: unsupported type {_type_name(tp)}")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unknown(key: str, choices: list[str], where: str) -> RecError:
    close = difflib.get_close_matches(key, choices, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(sorted(choices))})"
    return RecError(f"{where}: unknown key '{key}'{hint}")


def _apply_section(obj: Any, values: dict, prefix: str, source: str) -> None:
    hints = _field_types(type(obj))
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in hints:
            raise _unknown(dotted, [f"{prefix}{k}" for k in hints], source)
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise RecError(f"{source}: '{dotted}' must be a section (mapping), got {value!r}")
            _apply_section(getattr(obj, key), value, dotted + ".", source)
        else:
            setattr(obj, key, _coerce(value, tp, f"{source}: '{dotted}'"))


def _parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise RecError(f"override '{text}': expected key=value (e.g. train.steps=100)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecError(f"override '{text}': empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # treat as a plain string (e.g. a path with ':' in it)
    if isinstance(value, (dict,)) or value is None and raw.strip() not in ("", "null", "~"):
        value = raw
    return key.split("."), value


PACKAGED_CONFIGS = pathlib.Path(__file__).resolve().parent / "configs"


def resolve_config_path(path: str) -> str:
    """`path` itself when it exists; else a relative `configs/<stage>/<name>.yaml` is the copy shipped
    inside the package, so the names the docs and manifests use work from any directory of an
    installed wheel or the image."""
    if "://" in path or os.path.exists(path) or os.path.isabs(path):
        return path
    parts = pathlib.Path(path).parts
    if len(parts) >= 2 and parts[0] == "configs" and (PACKAGED_CONFIGS.joinpath(*parts[1:])).is_file():
        return str(PACKAGED_CONFIGS.joinpath(*parts[1:]))
    return path


def load_config(path: str | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- dotted overrides. Raises RecError on any problem."""
    cfg = Config()
    if path:
        from rec import storage

        path = resolve_config_path(path)
        if not storage.exists(path):
            raise RecError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(storage.read_text(path)) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise RecError(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
        if not isinstance(data, dict):
            raise RecError(f"{path}: expected a mapping of sections (run, model, data, train, ...)")
        _apply_section(cfg, data, "", path)
    for text in overrides or []:
        keys, value = _parse_override(text)
        nested: Any = value
        for k in reversed(keys):
            nested = {k: nested}
        if len(keys) == 1 and dataclasses.is_dataclass(_field_types(Config).get(keys[0], None)):
            raise RecError(f"override '{text}': '{keys[0]}' is a section; set one of its keys, e.g. {keys[0]}.<key>=...")
        _apply_section(cfg, nested, "", "override")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Cross-field checks with messages that name the key."""
    for key in ("fast_generate", "fast_decode_attention"):
        # YAML 1.1 reads on/off/yes/no as booleans, which the str field turned into "True"/"False".
        value = getattr(cfg.grpo, key)
        if value in ("True", "False"):
            setattr(cfg.grpo, key, "on" if value == "True" else "off")
    from rec.data.prompts import EVAL_STYLES  # noqa: PLC0415

    choices = {
        "run.wandb_mode": (cfg.run.wandb_mode, {"auto", "online", "offline", "disabled"}),
        "model.param_dtype": (cfg.model.param_dtype, {"float32", "bfloat16"}),
        "model.compute_dtype": (cfg.model.compute_dtype, {"float32", "bfloat16"}),
        "train.schedule": (cfg.train.schedule, {"linear", "cosine", "constant"}),
        "eval.prompt": (cfg.eval.prompt, set(EVAL_STYLES)),
        "rl.reward": (cfg.rl.reward, {"rule", "ranking", "ranking_only"}),
        "grpo.estimator": (cfg.grpo.estimator, {"grpo", "rloo"}),
        "grpo.fast_generate": (cfg.grpo.fast_generate, {"auto", "on", "off"}),
        "grpo.fast_decode_attention": (cfg.grpo.fast_decode_attention, {"auto", "on", "off"}),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise RecError(f"config: '{key}' must be one of {', '.join(sorted(allowed))}, got {value!r}")
    positive = {
        "train.batch_size": cfg.train.batch_size,
        "eval.beams": cfg.eval.beams,
        "eval.batch_size": cfg.eval.batch_size,
        "data.max_len": cfg.data.max_len,
        "rl.generations": cfg.rl.generations,
        "grpo.generations": cfg.grpo.generations,
        "grpo.max_new_tokens": cfg.grpo.max_new_tokens,
        "checkpoint.keep": cfg.checkpoint.keep,
    }
    for key, value in positive.items():
        if value <= 0:
            raise RecError(f"config: '{key}' must be positive, got {value}")
    non_negative = {
        "train.steps": cfg.train.steps,
        "train.micro_batch_size": cfg.train.micro_batch_size,
        "checkpoint.every_steps": cfg.checkpoint.every_steps,
        "mesh.memory_per_chip_gib": cfg.mesh.memory_per_chip_gib,
    }
    for key, value in non_negative.items():
        if value < 0:
            raise RecError(f"config: '{key}' must be >= 0, got {value}")
    if cfg.train.micro_batch_size and cfg.train.batch_size % cfg.train.micro_batch_size:
        raise RecError(
            f"config: 'train.batch_size' ({cfg.train.batch_size}) must be a multiple of "
            f"'train.micro_batch_size' ({cfg.train.micro_batch_size})"
        )
    if not cfg.eval.topk or any(k < 1 for k in cfg.eval.topk):
        raise RecError(f"config: 'eval.topk' must be a non-empty list of cut-offs >= 1, got {cfg.eval.topk}")
    if not 0.0 < cfg.grpo.top_p <= 1.0:
        raise RecError(f"config: 'grpo.top_p' must be in (0, 1], got {cfg.grpo.top_p}")
    if cfg.train.lr < 0:
        raise RecError(f"config: 'train.lr' must be >= 0, got {cfg.train.lr}")
    if not 0.0 <= cfg.train.dropout < 1.0:
        raise RecError(f"config: 'train.dropout' must be in [0, 1), got {cfg.train.dropout}")
    if not 0.0 <= cfg.data.select_fraction < 1.0:
        raise RecError(f"config: 'data.select_fraction' must be in [0, 1), got {cfg.data.select_fraction}")
    from rec.data.windows import check_train_from  # noqa: PLC0415

    check_train_from(cfg.data)


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config, extra: dict | None = None) -> str:
    """The resolved config as written to a run's config.yaml (extra: resolved runtime facts)."""
    data = to_dict(cfg)
    if extra:
        data["resolved"] = extra
    return yaml.safe_dump(data, sort_keys=False)


def env_flag(name: str, setting: str = "auto") -> bool:
    """Resolve an on/off/auto setting: the environment variable wins when set (0 = off, else on);
    otherwise "auto" and "on" mean on."""
    value = os.environ.get(name, "").strip()
    if value:
        return value.lower() not in ("0", "false", "no", "off")
    return setting != "off"
