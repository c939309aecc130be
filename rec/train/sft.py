"""`rec sft`: supervised fine-tuning on the MiniOneRec five-task mixture (upstream sft.py recipe).

Flow: join the multi-process run, build the mesh, load model + tokenizer (SID tokens added), build
the token examples of the task mixture (train split) and of the next-SID task (valid split), then
run optimizer steps of `train.batch_size` sequences (accumulated over `train.micro_batch_size`
micro-batches inside one jit) in fixed-shape length buckets.

Validation loss (token mean over the valid split) runs every `train.eval_every` steps (default
every 5% of the run, as upstream); a lower value saves `sft_best` (parameters only), every
validation (or every `checkpoint.every_steps`) saves `sft_last` (full train state: resumable; the
newest `checkpoint.keep` steps are kept; written asynchronously), and `train.early_stopping_patience`
validations without improvement stop the run.

Resume: with `run.resume` (default) a restarted run restores the newest `sft_last`: parameters,
optimizer state, step, RNG, data position (batches consumed; the batch order is a pure function of
(seed, epoch)) and the early-stopping counters, so it ends in the same state as an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rec import checkpoint, dist, storage
from rec.config import Config, to_dict
from rec.dist.preemption import Preempted, PreemptionGuard
from rec.errors import RecError
from rec.train.common import check_run_dir, load_model_and_tokenizer, prepare_run_dir
from rec.train.logging import MetricsLogger, merge_run_summary
from rec.train.step import chunked_token_logprobs, make_eval_step, make_train_step, shift_labels
from rec.train.optim import make_optimizer
from rec.train.state import abstract_state, init_state

log = logging.getLogger("rec.train")

STAGE = "sft"
BATCH_KEYS = ("input_ids", "labels", "attention_mask", "positions", "weights", "row_index")


# ---------------------------------------------------------------------------------------------
# Loss


def make_sft_loss(shape, compute_dtype: str = "bfloat16", remat: bool = True, chunk: int = 128, dropout: float = 0.0):
    """loss_fn(params, batch, extra) for rec.train.step: token-mean cross entropy over labels != -100
    of rows with weight > 0, computed from hidden states a sequence chunk at a time (f32
    log-softmax over the full vocabulary; padded vocabulary rows are -inf).

    With `dropout` > 0, `extra` is the step's PRNG key (None: no dropout, e.g. validation); each
    row's key folds in its position in the global batch (`row_index`), so the masks are the same
    however the batch is split over micro-batches and processes."""
    from rec.model.qwen2 import forward, logits_from_hidden

    dtype = jnp.dtype(compute_dtype)

    def loss_fn(params, batch, extra):
        keys = None
        if dropout > 0.0 and extra is not None:
            keys = jax.vmap(lambda i: jax.random.fold_in(extra, i))(batch["row_index"])
        hidden, _ = forward(
            params,
            shape,
            batch["input_ids"],
            batch["positions"],
            batch["attention_mask"],
            compute_dtype=dtype,
            remat=remat,
            return_hidden=True,
            dropout=dropout,
            dropout_keys=keys,
        )
        targets = shift_labels(batch["labels"])
        logprobs = chunked_token_logprobs(
            hidden, targets, lambda h: logits_from_hidden(params, shape, h), chunk
        )
        mask = (targets >= 0).astype(jnp.float32) * batch["weights"][:, None].astype(jnp.float32)
        count = mask.sum()
        loss = -(logprobs * mask).sum() / jnp.maximum(count, 1.0)
        return loss, {"weight": count}

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Helpers


def total_steps_for(train_cfg, batches_per_epoch: int) -> int:
    """`train.steps` when set, else ceil(epochs × batches per epoch)."""
    if train_cfg.steps > 0:
        return int(train_cfg.steps)
    if train_cfg.epochs <= 0:
        raise RecError("config: set 'train.steps' or a positive 'train.epochs'")
    return max(1, int(math.ceil(train_cfg.epochs * batches_per_epoch)))


def eval_interval(train_cfg, total_steps: int) -> int:
    """Steps between validations: `train.eval_every`, else 5% of the run (upstream eval_steps=0.05)."""
    if train_cfg.eval_every > 0:
        return int(train_cfg.eval_every)
    return max(1, int(math.ceil(0.05 * total_steps)))


def micro_batches(train_cfg, mesh) -> int:
    """Number of micro-batches per step; each must split evenly over the batch devices."""
    micro = train_cfg.micro_batch_size or train_cfg.batch_size
    devices = dist.batch_divisor(mesh)
    if micro % devices:
        raise RecError(
            f"config: 'train.micro_batch_size' ({micro}) must be a multiple of the {devices} devices on the "
            "('data','fsdp') mesh axes"
        )
    return train_cfg.batch_size // micro


def _device_batch(local: dict, mesh, global_size: int) -> dict:
    """Global arrays from this process's rows of the batch (`dist.process_rows` order)."""
    return dist.global_batch({k: local[k] for k in BATCH_KEYS}, mesh, global_size)


def _position(batches_consumed: int, per_epoch: int) -> tuple[int, int]:
    return batches_consumed // per_epoch, batches_consumed % per_epoch


def validation_loss(eval_step, params, valid_examples, batch_size: int, buckets, pad_id: int, mesh) -> float:
    """Token-mean loss over the whole validation set (fixed order; filler rows weigh 0)."""
    from rec.data.sft import bucketed_batches

    loss_sum = weight_sum = 0.0
    rows = dist.process_rows(mesh, batch_size)
    for batch in bucketed_batches(valid_examples, batch_size, buckets, seed=0, epoch=0, pad_id=pad_id, rows=rows):
        out = eval_step(params, _device_batch(batch, mesh, batch_size))
        weight = float(out["weight"])
        loss_sum += float(out["loss"]) * weight
        weight_sum += weight
    return loss_sum / max(weight_sum, 1e-12)


# ---------------------------------------------------------------------------------------------
# The run


def run_sft(cfg: Config) -> dict:
    """Train; returns the `train/*` summary figures (also merged into run_summary.json)."""
    return _train(cfg)


def _load_data(cfg: Config, tokenizer, catalogue):
    from rec.data.dataset import category_phrase
    from rec.data.sft import build_sft_examples, build_valid_examples, valid_wording

    # data.train_from: windowed rows of an earlier split + its held-out selection slice (rec/data/windows.py)
    from rec.data.windows import training_rows

    rows, valid_rows = training_rows(cfg.data, selection_limit=cfg.train.eval_limit)
    category = cfg.data.category or category_phrase(cfg.data.dir)
    progress = cfg.run.progress and dist.is_primary()
    train = build_sft_examples(
        tokenizer, catalogue, rows, cfg.data.tasks, category, cfg.run.seed, cfg.data.max_len, progress
    )
    wording = valid_wording(cfg.data.tasks)
    valid = build_valid_examples(tokenizer, valid_rows, cfg.data.max_len, wording) if valid_rows else []
    return train, valid, valid_rows


def _restore_or_init(cfg: Config, catalogue, mesh):
    """(shape, tokenizer, state, meta) — from the newest sft_last when resuming, else fresh."""
    from rec.model.qwen2 import ModelShape
    from rec.tokenizer import load_tokenizer

    run_dir = cfg.run.dir
    step = checkpoint.latest_step(run_dir, "sft_last") if cfg.run.resume else None
    if step is not None:
        if not storage.isdir(storage.join(run_dir, "tokenizer")):
            raise RecError(f"{run_dir}: has checkpoint sft_last/{step} but no tokenizer/ to resume with")
        meta = checkpoint.read_meta(run_dir, "sft_last", step)
        shape = ModelShape.from_hf_config(meta["model_config"])
        tokenizer = load_tokenizer(storage.join(run_dir, "tokenizer"))
        saved = checkpoint.params_metadata(run_dir, "sft_last", step)
        abstract_params = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype),
            saved,
            is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"),
        )
        return shape, tokenizer, abstract_params, (step, meta)
    shape, params, tokenizer = load_model_and_tokenizer(cfg, catalogue, STAGE, mesh)
    return shape, tokenizer, params, None


def _train(cfg: Config, crash_after: int | None = None) -> dict:
    """The SFT run. `crash_after` (tests only) stops abruptly after that many steps of this
    invocation, without any final save, like a killed process."""
    from rec.data.dataset import load_catalogue
    from rec.data.sft import batch_stream, batches_per_epoch, check_buckets
    from rec.model.qwen2 import PARTITION_RULES

    if not cfg.data.dir:
        raise RecError("config: 'data.dir' must name a MiniOneRec dataset directory")
    from rec.eval.evaluate import check_best_metric, decode_tables, ranking_metrics

    check_best_metric("train.best_metric", cfg.train.best_metric, "train.eval_beams", cfg.train.eval_beams)
    check_run_dir(cfg, "sft_last", "SFT")
    dist.init_distributed()
    mesh = dist.make_mesh(cfg.mesh.shape)
    num_micro = micro_batches(cfg.train, mesh)
    buckets = check_buckets(cfg.data.length_buckets)
    catalogue = load_catalogue(cfg.data.dir)

    shape, tokenizer, params_or_abstract, resumed = _restore_or_init(cfg, catalogue, mesh)
    train_examples, valid_examples, valid_rows = _load_data(cfg, tokenizer, catalogue)
    per_epoch = batches_per_epoch([len(e) for e in train_examples], cfg.train.batch_size, buckets)
    total = total_steps_for(cfg.train, per_epoch)
    every = eval_interval(cfg.train, total)
    save_every = cfg.checkpoint.every_steps or every
    optimizer = make_optimizer(cfg.train, total)

    if resumed is None:
        params = params_or_abstract
        state = init_state(params, optimizer.tx, cfg.run.seed, mesh)
        progress_meta: dict[str, Any] = {
            "best_val_loss": None,
            "best_step": None,
            "bad_evals": 0,
            "finished": False,
        }
    else:
        step, meta = resumed
        abstract_params = params_or_abstract
        param_sh = dist.param_shardings(abstract_params, mesh, PARTITION_RULES)
        target = abstract_state(abstract_params, param_sh, optimizer.tx, mesh, cfg.run.seed)
        state, meta = checkpoint.restore(cfg.run.dir, "sft_last", target, step)
        progress_meta = dict(meta.get("early_stopping") or {})
        progress_meta.setdefault("finished", False)
        log.info("resumed sft_last step %d", step)

    # Before anything is written: refuse a config that cannot fit a chip.
    from rec.train.memory import check_fits, estimate

    micro_rows = cfg.train.micro_batch_size or cfg.train.batch_size
    check_fits(
        estimate(state, shape, mesh, micro_rows, max(buckets), cfg.model.compute_dtype, cfg.model.remat,
                 configured_gib=cfg.mesh.memory_per_chip_gib),
        "train.micro_batch_size", micro_rows, "data.length_buckets", max(buckets),
    )

    pad_id = int(tokenizer.pad_token_id)
    prepare_run_dir(
        cfg,
        STAGE,
        {
            "model_config": shape.to_hf_config(cfg.model.param_dtype),
            "train_examples": len(train_examples),
            "valid_examples": len(valid_examples),
            "batches_per_epoch": per_epoch,
            "total_steps": total,
            "micro_batches": num_micro,
        },
        tokenizer,
    )

    loss_fn = make_sft_loss(shape, cfg.model.compute_dtype, cfg.model.remat, dropout=cfg.train.dropout)
    state_sh = jax.tree.map(lambda x: x.sharding, state)
    step_fn = make_train_step(loss_fn, optimizer, num_micro, state_shardings=state_sh, mesh=mesh)
    eval_step = make_eval_step(loss_fn, 1)
    eval_batch = micro_rows

    start_step = int(state.step)
    writer = checkpoint.Checkpointer(cfg.run.dir, async_save=cfg.checkpoint.async_save)
    logger = MetricsLogger(cfg.run.dir, STAGE, cfg, total_steps=total, initial_step=start_step)

    def meta_for(state_now, metrics: dict) -> dict:
        consumed = int(state_now.data_position)
        epoch, index = _position(consumed, per_epoch)
        return {
            "stage": STAGE,
            "model_config": shape.to_hf_config(cfg.model.param_dtype),
            "data_position": {
                "batches": consumed,
                "epoch": epoch,
                "batch_index": index,
                "batches_per_epoch": per_epoch,
            },
            "rng": [int(x) for x in np.asarray(dist.process_allgather(state_now.rng)).ravel()],
            "early_stopping": dict(progress_meta),
            "metrics": metrics,
            "config": to_dict(cfg),
        }

    def save_last(state_now, metrics: dict) -> None:
        logger.flush()
        writer.save("sft_last", state_now, int(state_now.step), meta_for(state_now, metrics), keep=cfg.checkpoint.keep)

    last_metrics: dict = {}
    metric = cfg.train.best_metric
    best_key = "best_value" if metric else "best_val_loss"  # where progress_meta keeps the best so far
    trie, id_to_token = decode_tables(tokenizer, catalogue) if metric and valid_rows else (None, None)
    dropout_key = jax.random.PRNGKey(cfg.run.seed)
    if progress_meta.get("best_step") is not None and progress_meta.get("best_metric", "") != metric:
        raise RecError(f"{cfg.run.dir}: sft_best was picked by {progress_meta.get('best_metric') or 'validation loss'}; "
                       f"resume with the same 'train.best_metric' or use another run.dir")
    # Throughput over this invocation's steps after its first (which includes compilation).
    steady_tokens, steady_seconds = 0, 0.0
    stream = batch_stream(
        train_examples,
        cfg.train.batch_size,
        buckets,
        cfg.run.seed,
        pad_id,
        start=_position(int(state.data_position), per_epoch),
        rows=dist.process_rows(mesh, cfg.train.batch_size),  # this process builds only its rows
    )
    steps_this_run = 0
    step = start_step
    with PreemptionGuard() as guard:
        while step < total and not progress_meta["finished"]:
            epoch, index, batch = next(stream)
            t0 = time.perf_counter()
            # dropout key of this step: from the seed and the step only, so a resumed run repeats it
            key = jax.random.fold_in(dropout_key, int(state.step)) if cfg.train.dropout else None
            state, metrics = step_fn(state, _device_batch(batch, mesh, cfg.train.batch_size), key)
            metrics = {k: float(v) for k, v in metrics.items()}  # syncs: step time is real
            step = int(state.step)
            dt = time.perf_counter() - t0
            real_tokens = int(batch["real_tokens"])
            if steps_this_run > 0:
                steady_tokens += real_tokens
                steady_seconds += dt
            metrics.update(
                tokens_per_s=real_tokens / max(dt, 1e-9),
                epoch=epoch + (index + 1) / per_epoch,
                target_tokens=metrics.pop("weight"),
            )
            last_metrics = metrics
            if step % max(cfg.train.log_every, 1) == 0 or step == total:
                logger.log(step, metrics)

            if valid_examples and (step % every == 0 or step == total):
                val = validation_loss(eval_step, state.params, valid_examples, eval_batch, buckets, pad_id, mesh)
                entry = {"val_loss": val}
                if metric:
                    ranked = ranking_metrics(state.params, shape, valid_rows, tokenizer, catalogue, mesh,
                                             prompt_style=cfg.eval.prompt, batch_size=cfg.eval.batch_size,
                                             beams=cfg.train.eval_beams, topk=cfg.eval.topk, pad_id=pad_id,
                                             compute_dtype=jnp.dtype(cfg.model.compute_dtype), trie=trie,
                                             id_to_token=id_to_token)
                    entry.update({f"val/{k}": v for k, v in ranked.items()})
                value = ranked[metric] if metric else val
                best = progress_meta.get(best_key)
                improved = best is None or (value > best if metric else value < best)  # HR/NDCG up, loss down
                if improved:
                    progress_meta.update(best_val_loss=val, best_step=step, bad_evals=0)
                    if metric:
                        progress_meta.update(best_value=value, best_metric=metric)
                else:
                    progress_meta["bad_evals"] += 1
                patience = cfg.train.early_stopping_patience
                if patience > 0 and progress_meta["bad_evals"] >= patience:
                    progress_meta["finished"] = True
                    log.info("early stopping at step %d (best %.5f at step %s)", step, progress_meta[best_key],
                             progress_meta["best_step"])
                entry[f"best_val/{metric}" if metric else "best_val_loss"] = progress_meta[best_key]
                logger.log(step, entry, show=True)
                if improved:
                    writer.save("sft_best", {"params": state.params}, step, meta_for(state, dict(metrics, val_loss=val)))
                save_last(state, dict(metrics, val_loss=val))
            elif step % save_every == 0:
                save_last(state, metrics)

            steps_this_run += 1
            if guard.reached(step) and step < total and not progress_meta["finished"]:
                # SIGTERM (preemption): every process saves this same step, then the CLI exits 143.
                if writer.last_saved("sft_last") != step:
                    save_last(state, last_metrics)
                writer.close()
                logger.close()
                raise Preempted(step, storage.join(cfg.run.dir, "checkpoints", "sft_last", str(step)))
            if crash_after is not None and steps_this_run >= crash_after and step < total:
                writer.wait()  # a kill after the save finished (the SIGKILL test covers mid-save kills)
                logger.close()
                raise _SimulatedCrash(step)

    # Early stopping is recorded in the meta of the sft_last saved at that validation; reaching
    # `total` is visible from the step itself. So only an unsaved final step needs a save here.
    if writer.last_saved("sft_last") != step:
        save_last(state, last_metrics)
    if not valid_examples or writer.last_saved("sft_best") is None:
        # No validation set: the final weights are the best we have.
        writer.save("sft_best", {"params": state.params}, step, meta_for(state, last_metrics))
    writer.close()
    logger.close()

    summary = {
        "train/steps": step,
        "train/total_steps": total,
        "train/epochs": step / per_epoch,
        "train/final_loss": last_metrics.get("loss"),
        "train/best_val_loss": progress_meta.get("best_val_loss"),
        "train/best_step": progress_meta.get("best_step"),
        **({f"train/best_val/{metric}": progress_meta.get("best_value")} if metric else {}),
        "train/early_stopped": step < total,
        "train/examples": len(train_examples),
        "train/tokens_per_s": steady_tokens / steady_seconds if steady_seconds > 0 else None,
        "train/processes": jax.process_count(),
        "train/devices": jax.device_count(),
    }
    merge_run_summary(cfg.run.dir, summary)
    dist.sync("sft-done")
    return summary


class _SimulatedCrash(RuntimeError):
    """Raised by `_train(crash_after=...)` in tests to stand for a killed process."""
