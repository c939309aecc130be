"""What every stage does first: find the model and tokenizer, extend the vocabulary, place on the mesh.

`model.path` may be
- a Hugging Face model directory (has config.json): weights via `rec.model.hf_io.load_hf`,
  tokenizer from the same directory unless `model.tokenizer` names another;
- a run directory of ours (has checkpoints/ or config.yaml): parameters of checkpoint tag
  `model.checkpoint` (default `sft_best` for rl/eval/grpo, `sft_last` for sft, the newest of
  rl_last/sft_best/sft_last when the stage is "export"), tokenizer from `run_dir/tokenizer/`;
- "" : random weights of the named `model.shape` (tests, demo, benchmarks) with the tokenizer
  from `model.tokenizer`.

Then the catalogue's SID tokens are added to the tokenizer in sorted order and, when the
tokenizer became longer than the model's vocabulary, the embeddings grow to `len(tokenizer)`
(upstream `resize_token_embeddings(len(tokenizer))`; Qwen's spare rows are used first because
its vocab_size already exceeds the tokenizer). A run directory's tokenizer already has them.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import tempfile

import jax
import jax.numpy as jnp

from rec import checkpoint, dist, storage
from rec.config import Config, dump_yaml
from rec.errors import RecError

log = logging.getLogger("rec.train")

DEFAULT_TAGS = {"sft": "sft_last", "rl": "sft_best", "eval": "sft_best", "grpo": "sft_best"}


def is_run_dir(path: str) -> bool:
    return storage.exists(storage.join(path, "checkpoints")) or storage.exists(
        storage.join(path, "config.yaml")
    )


def resolve_checkpoint_tag(run_dir: str, requested: str, stage: str) -> str:
    """The tag to load from a run directory; RecError naming what exists when it is missing."""
    tags = checkpoint.list_tags(run_dir)
    if requested:
        tag = requested
    elif stage in DEFAULT_TAGS:
        tag = DEFAULT_TAGS[stage]
    else:
        tag = next((t for t in checkpoint.PREFERRED_TAGS if t in tags), tags[0] if tags else "")
    if tag not in tags:
        have = ", ".join(tags) if tags else "none"
        raise RecError(f"{run_dir}: no checkpoint '{tag or '?'}' (model.checkpoint); available: {have}")
    return tag


def _param_dtype(cfg: Config):
    return jnp.dtype(cfg.model.param_dtype)


def _random_params(shape, cfg: Config, mesh):
    from rec.model.qwen2 import PARTITION_RULES, init_params

    init = functools.partial(
        init_params, shape, param_dtype=_param_dtype(cfg), vocab_multiple=cfg.model.vocab_multiple
    )
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = dist.param_shardings(abstract, mesh, PARTITION_RULES)
    # Initialise directly into the sharded layout: no full copy on one device.
    return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(cfg.run.seed))


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a stage's weights come from: an HF directory, a run's checkpoint (tag and step), or a
    random init of model.shape."""

    kind: str  # "hf" | "run" | "random"
    path: str = ""
    tag: str = ""
    step: int | None = None

    def __str__(self) -> str:
        if self.kind == "run":
            return f"run:{self.path}#{self.tag}@{self.step}"
        return f"{self.kind}:{self.path}"


def model_source(cfg: Config, stage: str) -> ModelSource:
    """Resolve model.path / model.checkpoint for `stage`; a one-line RecError when it names nothing usable."""
    path = cfg.model.path
    if path and storage.exists(storage.join(path, "config.json")):
        return ModelSource("hf", path)
    if path and is_run_dir(path):
        tag = resolve_checkpoint_tag(path, cfg.model.checkpoint, stage)
        return ModelSource("run", path, tag, checkpoint.latest_step(path, tag))
    if path:
        raise RecError(
            f"model.path: {path} is neither a Hugging Face model directory (config.json) nor a run directory"
        )
    if not cfg.model.tokenizer:
        raise RecError("model.tokenizer: a tokenizer directory is needed when model.path is empty (random init)")
    return ModelSource("random", cfg.model.shape)


def load_model_and_tokenizer(cfg: Config, catalogue=None, stage: str = "sft", mesh=None,
                             source: ModelSource | None = None):
    """(shape, params placed on the mesh, tokenizer with the catalogue's SID tokens). `source`: the
    caller's `model_source(cfg, stage)` when it has resolved it already (so both name one step)."""
    from rec.model.qwen2 import PARTITION_RULES, get_shape, shape_with_vocab
    from rec.model.resize import grow_vocab
    from rec.tokenizer import add_sid_tokens, load_tokenizer, sid_tokens

    mesh = mesh if mesh is not None else dist.make_mesh(cfg.mesh.shape)
    source = source or model_source(cfg, stage)
    if source.kind == "hf":
        from rec.model.hf_io import load_hf

        tokenizer = load_tokenizer(cfg.model.tokenizer or source.path)
        shape, params = load_hf(
            source.path,
            param_dtype=cfg.model.param_dtype,
            vocab_multiple=cfg.model.vocab_multiple,
            progress=cfg.run.progress and dist.is_primary(),
        )
    elif source.kind == "run":
        tokenizer = load_tokenizer(cfg.model.tokenizer or storage.join(source.path, "tokenizer"))
        shape, params = checkpoint.load_params(
            source.path, source.tag, mesh=mesh, rules=PARTITION_RULES, step=source.step, dtype=cfg.model.param_dtype
        )
    else:
        tokenizer = load_tokenizer(cfg.model.tokenizer)
        shape, params = None, None

    added = add_sid_tokens(tokenizer, sid_tokens(catalogue)) if catalogue is not None else 0
    if params is None:
        shape = get_shape(cfg.model.shape)
        # The tiny shape's vocabulary is a placeholder: size it to the tokenizer exactly.
        vocab = len(tokenizer) if cfg.model.shape == "tiny" else max(shape.vocab_size, len(tokenizer))
        shape = shape_with_vocab(shape, vocab)
        params = _random_params(shape, cfg, mesh)
    else:
        if len(tokenizer) > shape.vocab_size:
            shape, params = grow_vocab(params, shape, len(tokenizer), vocab_multiple=cfg.model.vocab_multiple)
        params = dist.shard_params(params, mesh, PARTITION_RULES)
    log.info(
        "model %s: vocab %d (%d SID tokens added), %s", source, shape.vocab_size, added, cfg.model.param_dtype
    )
    return shape, params, tokenizer


def eos_and_pad_ids(tok, cfg: Config) -> tuple[int, int]:
    """(EOS id, pad id) of the tokenizer, pad falling back to EOS; RecError when it has no EOS."""
    eos_id = tok.eos_token_id
    if eos_id is None:
        raise RecError(f"{cfg.model.path or cfg.model.tokenizer}: the tokenizer has no EOS token")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else eos_id
    return eos_id, pad_id


def check_eval_batch_divisible(cfg: Config, divisor: int) -> None:
    """RecError when eval.batch_size does not split over the `divisor` batch-axis devices."""
    if cfg.eval.batch_size % divisor:
        raise RecError(f"config: 'eval.batch_size' ({cfg.eval.batch_size}) must be a multiple of {divisor} devices")


def save_tokenizer(tokenizer, run_dir: str) -> str:
    """Write the tokenizer files to run_dir/tokenizer/ (each file atomically; primary only)."""
    target = storage.join(run_dir, "tokenizer")
    if not dist.is_primary():
        return target
    with tempfile.TemporaryDirectory(prefix="rec-tok-") as tmp:
        tokenizer.save_pretrained(tmp)
        for name in sorted(os.listdir(tmp)):
            full = os.path.join(tmp, name)
            if os.path.isfile(full):
                with open(full, "rb") as f:
                    storage.write_bytes(storage.join(target, name), f.read())
    return target


def check_run_dir(cfg: Config, tag: str, stage: str) -> None:
    """Before any work: run.dir must be a directory we can write, and a fresh run
    (`run.resume=false`) into one that already holds `tag` checkpoints is an error: Orbax keeps
    existing steps, so the new run would save nothing over the old steps, trim the old metrics and
    hand the old weights on, without a word."""
    storage.check_output_dir(cfg.run.dir, "run.dir")
    if not cfg.run.resume and checkpoint.latest_step(cfg.run.dir, tag) is not None:
        raise RecError(
            f"{cfg.run.dir}: already holds {stage} checkpoints (checkpoints/{tag}); use another run.dir "
            "or run.resume=true to continue it"
        )


def refuse_sft_only_keys(cfg: Config, stage: str) -> None:
    """RL/GRPO compare log-probabilities of one policy across forwards, so they run without
    dropout; a `train.dropout` set for them would be silently ignored, so it is an error."""
    if cfg.train.dropout:
        raise RecError(f"config: 'train.dropout' is for SFT only ({stage} runs without dropout), got {cfg.train.dropout}")


def prepare_run_dir(cfg: Config, stage: str, extra: dict | None = None, tokenizer=None) -> None:
    """Write the resolved config (config.yaml and config.<stage>.yaml) and the tokenizer.

    Primary process only; other processes return at once. Safe to call again on resume."""
    if not dist.is_primary():
        return
    storage.makedirs(cfg.run.dir)
    text = dump_yaml(
        cfg, dict(extra or {}, stage=stage, processes=jax.process_count(), devices=jax.device_count())
    )
    storage.write_text(storage.join(cfg.run.dir, "config.yaml"), text)
    storage.write_text(storage.join(cfg.run.dir, f"config.{stage}.yaml"), text)
    if tokenizer is not None:
        save_tokenizer(tokenizer, cfg.run.dir)


# ---------------------------------------------------------------------------------------------
# What the rollout trainers (recommendation RL, GSM8K GRPO) share


def rollout_checkpoint_tree(state, ref_params) -> dict:
    """The resumable tree of a rollout trainer: the train state plus the reference parameters
    (absent when the stage has no KL reference)."""
    tree = state.as_dict()
    if ref_params is not None:
        tree["ref_params"] = ref_params
    return tree


def crossed_multiple(step: int, updates: int, every: int) -> bool:
    """Whether the last `updates` optimizer steps, ending at `step`, passed a multiple of `every`.
    Rollout trainers advance `updates_per_batch` steps at a time, so `step % every == 0` alone would
    skip the multiples that fall inside a batch."""
    return every > 0 and step // every > (step - updates) // every


def check_steps_per_batch(cfg: Config, key: str, updates_per_batch: int) -> None:
    """`train.steps` counts optimizer steps; a rollout trainer takes them `updates_per_batch` at a
    time, so another count would overshoot it and miss the final save and validation."""
    if cfg.train.steps % updates_per_batch:
        raise RecError(
            f"config: 'train.steps' ({cfg.train.steps}) must be a multiple of '{key}' ({updates_per_batch}): "
            "each rollout batch takes that many optimizer steps"
        )


def save_rollout_last(cfg: Config, tag: str, writer, logger, guard, step: int, updates: int, total_steps: int,
                      save_every: int, state, ref_params, meta: dict) -> None:
    """Save the resumable `tag` checkpoint (state + reference) when the last `updates` steps passed
    a multiple of `save_every`, at the last step, and when a SIGTERM arrived (preemption: every
    process saves this same step, then Preempted is raised and the CLI exits 143)."""
    from rec.dist.preemption import Preempted

    preempted = guard.reached(step) and step < total_steps
    periodic = crossed_multiple(step, updates, save_every)
    if (periodic or step == total_steps or preempted) and writer.last_saved(tag) != step:
        logger.flush()
        writer.save(tag, rollout_checkpoint_tree(state, ref_params), step, meta, keep=cfg.checkpoint.keep)
    if preempted:
        raise Preempted(step, f"{cfg.run.dir}/checkpoints/{tag}/{step}")


def resume_rollout_state(cfg: Config, tag: str, state, ref_params, tx, mesh):
    """(state, ref_params, meta) from the newest finalised step of `tag` when `run.resume` and one
    exists; otherwise the given values and meta None. Restored straight onto the live layout."""
    from rec.train.state import abstract_state

    step = checkpoint.latest_step(cfg.run.dir, tag) if cfg.run.resume else None
    if step is None:
        return state, ref_params, None
    param_sh = jax.tree.map(lambda p: p.sharding, state.params)
    abstract = abstract_state(state.params, param_sh, tx, mesh, cfg.run.seed)
    abstract_ref = None
    if ref_params is not None:
        abstract_ref = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=p.sharding), ref_params)
    values, meta = checkpoint.restore(cfg.run.dir, tag, rollout_checkpoint_tree(abstract, abstract_ref), step)
    restored_ref = values.pop("ref_params", None)
    return type(state).from_dict(values), restored_ref, meta


def check_rollout_memory(cfg: Config, state, shape, mesh, micro_prompts: int, group: int, seq_len: int,
                         ref_params=None, batch_key: str = "train.micro_batch_size") -> None:
    """Pre-flight memory check of a rollout trainer: micro-batches of `micro_prompts` x `group`
    sequences of `seq_len` tokens, plus the KV cache of one rollout call of the same rows and the
    reference parameters (a second copy, when the stage keeps one)."""
    from rec.train.memory import check_fits, estimate, shard_bytes

    rows = micro_prompts * group
    per_chip_rows = -(-rows // dist.batch_divisor(mesh))
    kv_cache = (2 * shape.num_layers * per_chip_rows * seq_len * shape.num_kv_heads * shape.head_dim
                * jnp.dtype(cfg.model.compute_dtype).itemsize)
    reference = shard_bytes(ref_params) if ref_params is not None else 0.0
    est = estimate(state, shape, mesh, rows, seq_len, cfg.model.compute_dtype, cfg.model.remat,
                   extra_bytes=kv_cache + reference, configured_gib=cfg.mesh.memory_per_chip_gib)
    check_fits(est, batch_key, micro_prompts, "data.max_len", seq_len)
