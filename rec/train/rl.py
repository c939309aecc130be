"""`rec rl`: recommendation RL, GRPO-style with constrained beam-search rollouts (MiniOneRec §6).

One optimizer step (defaults = upstream rl.sh):
1. take the next `train.batch_size` (64) prompts of the shuffled RL prompt sets (`rl.tasks`:
   next-SID from SID history, title/description -> SID, title history -> SID), each carrying its
   own target SID (upstream bug B7 fixed) and ending at "### Response:\\n" (answer leak B1 fixed);
2. rollouts: `constrained_beam_search` with G = `rl.generations` (16) beams per prompt, so every
   completion is a distinct valid SID followed by "\\n" and EOS, ranked by beam score;
3. rewards (`rl.reward`: rule | ranking_only | ranking = rule + rank penalty, weighted by
   `rl.reward_weights`), group-normalised advantages (R - mean) / (unbiased std + 1e-4);
4. per-token log-probs of the completions under the reference model (k3 KL, `rl.beta` 1e-3) and,
   with `rl.updates_per_batch` > 1, under the rollout policy (PPO ratio clipping, `rl.clip_eps`);
5. `rl.updates_per_batch` optimizer steps on loss = token-mean per sequence, mean over sequences of
   -(ratio * A - beta * KL), through the shared jitted train step (gradient accumulation over
   micro-batches of `train.micro_batch_size` prompts x G completions);
6. every `rl.ref_sync_every` (512) steps: ref <- (1 - alpha) * ref + alpha * policy (alpha 0.6).

Rollouts also run per micro-batch of `train.micro_batch_size` prompts (bounds the B*G-row KV cache),
with the decode-specialised attention unless ROLLOUT_FAST_QWEN2_DECODE_ATTENTION=0 (recorded in
config.yaml as `resolved.rollout_fast_qwen2_decode_attention`).
Prompts of a step are left padded to the smallest of `data.length_buckets` that holds them (fixed
shapes: one compile per bucket). Validation (every `rl.eval_every` steps, 0 = every 10% of the run,
and at the end): constrained beam search with `rl.eval_beams` beams over the first `rl.eval_limit`
rows of `data.valid_split` (-1 = all, 0 = no validation) with the eval prompts (`eval.prompt`),
HR@K/NDCG@K for `eval.topk` computed by rec.eval.metrics.

Checkpoints: `rl_last` (policy, optimizer state, step, reference model) at each validation or every
`checkpoint.every_steps` steps and at the end (the newest `checkpoint.keep` kept); `rl_best` (parameters only) by `rl.best_metric` (e.g.
"hr@10") when set. A restarted run resumes from `rl_last` (prompt order is a pure function of (seed, step)).

Deliberate deviations from upstream (reference §6.1, bugs B1 and B7):
- B1: upstream's title/description -> SID prompts end with the answer ("### Response:\n<SID>"),
  which breaks the trie key and gives degenerate rollouts; ours end at "### Response:\n".
- B7: upstream finds a prompt's target through dicts keyed by the history string, so rows sharing
  a history (including validation rows merged last) get one row's target; here every prompt
  carries the target of the row it was built from (rec/data/rl.py).
- Additions: periodic validation and `rl_best` (upstream keeps no best model); the prompt order
  is our own per-epoch permutation (upstream: a RepeatRandomSampler with seed 42).
Every process computes the same rewards (the rollout SIDs are all-gathered: a few KB), so one and
N processes give the same result over the same global batch.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from rec.errors import RecError
from rec.train.advantages import compute_advantages
from rec.train.losses import completion_logprobs, rec_policy_loss
from rec.train.rewards import recommendation_rewards, sid_hits

log = logging.getLogger("rec.train")

STAGE = "rl"
LAST_TAG = "rl_last"
BEST_TAG = "rl_best"
COMPUTE_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}


# ---------------------------------------------------------------------------------------------
# Pure helpers


def epoch_permutation(num_prompts: int, seed: int, epoch: int) -> np.ndarray:
    """The prompt order of one epoch (a pure function of seed and epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(num_prompts)


def step_prompt_indices(rollout_index: int, prompts_per_step: int, num_prompts: int, seed: int) -> np.ndarray:
    """Indices of the prompts of rollout batch `rollout_index`: consecutive slices of the
    concatenated per-epoch permutations (a batch may straddle two epochs)."""
    start = rollout_index * prompts_per_step
    positions = np.arange(start, start + prompts_per_step)
    epochs = positions // num_prompts
    out = np.empty(prompts_per_step, dtype=np.int64)
    for epoch in np.unique(epochs):
        order = epoch_permutation(num_prompts, seed, int(epoch))
        sel = epochs == epoch
        out[sel] = order[positions[sel] % num_prompts]
    return out


def bucket_length(max_len: int, buckets: list[int]) -> int:
    """The smallest bucket that holds `max_len` tokens, else the largest (longer prompts are
    truncated from the left), so a run compiles at most once per bucket."""
    fitting = [b for b in sorted(buckets) if b >= max_len]
    return fitting[0] if fitting else max(buckets)


def left_pad_prompts(token_lists: list[list[int]], length: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[N, length] ids and mask, prompts right-aligned, keeping each prompt's last `length` tokens."""
    ids = np.full((len(token_lists), length), pad_id, np.int32)
    mask = np.zeros((len(token_lists), length), np.int32)
    for i, tokens in enumerate(token_lists):
        tokens = tokens[-length:]
        if tokens:
            ids[i, length - len(tokens) :] = tokens
            mask[i, length - len(tokens) :] = 1
    return ids, mask


def completion_tokens(sid_ids: np.ndarray, newline_id: int, eos_id: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """[P, G, depth] SID token ids (-1 past a shorter SID) -> completions [P*G, depth + 2]:
    the SID tokens, "\\n", EOS, then padding (mask 0)."""
    prompts, group, depth = sid_ids.shape
    flat = sid_ids.reshape(prompts * group, depth)
    ids = np.full((flat.shape[0], depth + 2), pad_id, np.int32)
    mask = np.zeros((flat.shape[0], depth + 2), np.int32)
    for row, sid in enumerate(flat):
        tokens = [int(t) for t in sid if t >= 0] + [newline_id, eos_id]
        ids[row, : len(tokens)] = tokens
        mask[row, : len(tokens)] = 1
    return ids, mask


def categorical_diversity(completions: list[list[str]]) -> float:
    """Mean over prompts of (distinct completions / G), as upstream logs it."""
    return float(np.mean([len(set(group)) / len(group) for group in completions])) if completions else 0.0


def reward_metrics(total: np.ndarray, terms: dict[str, np.ndarray], hits: np.ndarray) -> dict[str, float]:
    """Per-step reward figures: mean/std overall and per reward function, hit rates."""
    metrics = {
        "reward": float(total.mean()),
        "reward_std": float(total.std(axis=1, ddof=1).mean()) if total.shape[1] > 1 else 0.0,
        "hit_rate": float(hits.any(axis=1).mean()),  # target among the G beams
        "hit@1": float(hits[:, 0].mean()),
    }
    for name, values in terms.items():
        metrics[f"rewards/{name}_mean"] = float(values.mean())
        metrics[f"rewards/{name}_std"] = float(values.std())
    return metrics


def mix_reference(ref_params, params, alpha: float):
    """TRL's SyncRefModelCallback: ref <- (1 - alpha) * ref + alpha * policy."""
    return jax.tree.map(lambda r, p: ((1.0 - alpha) * r + alpha * p.astype(r.dtype)).astype(r.dtype), ref_params, params)


def unsplit_micro_batches(x: jax.Array) -> jax.Array:
    """Inverse of rec.train.step.split_micro_batches: [M, B/M, ...] -> [B, ...]."""
    return jnp.swapaxes(x, 0, 1).reshape(x.shape[0] * x.shape[1], *x.shape[2:])


# ---------------------------------------------------------------------------------------------
# Config checks


def check_rl_config(cfg) -> None:
    rl = cfg.rl
    if not cfg.data.dir:
        raise RecError("config: 'data.dir' is empty; set it to a MiniOneRec dataset directory")
    if rl.generations < 2:
        raise RecError(f"config: 'rl.generations' must be at least 2 (group-normalised advantages), got {rl.generations}")
    if rl.updates_per_batch < 1:
        raise RecError(f"config: 'rl.updates_per_batch' must be >= 1, got {rl.updates_per_batch}")
    if rl.beta < 0:
        raise RecError(f"config: 'rl.beta' must be >= 0, got {rl.beta}")
    if not 0.0 < rl.clip_eps < 1.0:
        raise RecError(f"config: 'rl.clip_eps' must be in (0, 1), got {rl.clip_eps}")
    if not 0.0 <= rl.ref_sync_alpha <= 1.0:
        raise RecError(f"config: 'rl.ref_sync_alpha' must be in [0, 1], got {rl.ref_sync_alpha}")
    if rl.ref_sync_every < 0 or rl.eval_every < 0:
        raise RecError("config: 'rl.ref_sync_every' and 'rl.eval_every' must be >= 0")
    if rl.eval_beams < 1:
        raise RecError(f"config: 'rl.eval_beams' must be positive, got {rl.eval_beams}")
    from rec.eval.evaluate import check_best_metric

    check_best_metric("rl.best_metric", rl.best_metric, "rl.eval_beams", rl.eval_beams)
    if not rl.tasks:
        raise RecError("config: 'rl.tasks' is empty")
    from rec.train.common import check_steps_per_batch  # noqa: PLC0415

    check_steps_per_batch(cfg, "rl.updates_per_batch", rl.updates_per_batch)
    from rec.train.rewards import REC_REWARD_TERMS, resolve_weights

    resolve_weights(REC_REWARD_TERMS[rl.reward], list(rl.reward_weights), "rl.reward_weights")  # before any write


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class _Setup:
    cfg: object
    mesh: object
    shape: object
    tokenizer: object
    trie: object
    catalogue: object
    prompt_ids: list
    targets: list
    valid_rows: list
    pad_id: int
    newline_id: int
    eos_id: int
    compute_dtype: object
    micro_prompts: int
    total_steps: int
    id_to_token: object  # token id -> token string (a list over the vocabulary, or a dict)
    # beam-search decode-step attention: "fast" unless ROLLOUT_FAST_QWEN2_DECODE_ATTENTION=0
    decode_attention: str = "fast"


def _prepare(cfg, mesh):
    """Catalogue, rows, model, tokenizer, trie and tokenized prompts."""
    from rec.data.dataset import load_catalogue, read_split, split_path
    from rec.data.rl import rl_prompt_ids, rl_prompts
    from rec.dist import batch_divisor
    from rec.eval.evaluate import decode_tables
    from rec.tokenizer import newline_id
    from rec.train.common import check_eval_batch_divisible, eos_and_pad_ids, load_model_and_tokenizer

    rl, train = cfg.rl, cfg.train
    catalogue = load_catalogue(cfg.data.dir)
    # data.train_from: windowed rows of an earlier split + its held-out selection slice (rec/data/windows.py)
    from rec.data.windows import training_rows, training_source

    rows, valid_rows = training_rows(cfg.data, selection_limit=rl.eval_limit if _validation_enabled(cfg) else 0)
    known = set(catalogue.all_sids)
    if any(s not in known for r in rows for s in (r.item_sid, *r.history_sids)):
        from rec.eval.evaluate import check_rows

        source = training_source(cfg.data)  # check the split as read, so the message names file:line
        check_rows(split_path(cfg.data.dir, source), read_split(cfg.data.dir, source, limit=cfg.data.limit), known)
    # the prompt set is upstream's (its seq_title2sid sample uses seed 0); run.seed orders the epochs
    prompts = rl_prompts(catalogue, rows, rl.tasks, seq_title_sample=rl.seq_title_sample)

    micro = train.micro_batch_size or train.batch_size
    divisor = batch_divisor(mesh)
    if micro % divisor:
        raise RecError(
            f"config: prompts per rollout/micro-batch ({micro}: train.micro_batch_size, or train.batch_size when 0) "
            f"must be a multiple of the {divisor} devices on the batch axes of mesh '{cfg.mesh.shape}'"
        )
    if valid_rows:
        check_eval_batch_divisible(cfg, divisor)

    shape, params, tok = load_model_and_tokenizer(cfg, catalogue, STAGE, mesh=mesh)
    eos_id, pad_id = eos_and_pad_ids(tok, cfg)  # a one-line error when the tokenizer has no EOS
    nl_id = newline_id(tok)
    trie, id_to_token = decode_tables(tok, catalogue)  # the same tables as rec eval's
    if rl.generations > trie.num_sids:
        raise RecError(f"config: 'rl.generations' ({rl.generations}) is more than the {trie.num_sids} distinct SIDs")
    if valid_rows and rl.eval_beams > trie.num_sids:
        raise RecError(f"config: 'rl.eval_beams' ({rl.eval_beams}) is more than the {trie.num_sids} distinct SIDs")
    prompt_ids = rl_prompt_ids(tok, prompts, max_prompt_len=cfg.data.max_len)

    # train.steps counts optimizer steps; epochs count passes over the prompts (each rollout batch
    # gives rl.updates_per_batch steps).
    total_steps = train.steps or max(1, math.ceil(train.epochs * len(prompts) / train.batch_size)) * rl.updates_per_batch
    setup = _Setup(
        cfg=cfg, mesh=mesh, shape=shape, tokenizer=tok, trie=trie, catalogue=catalogue, prompt_ids=prompt_ids,
        targets=[p.target_sid for p in prompts], valid_rows=valid_rows, pad_id=pad_id, newline_id=nl_id,
        eos_id=eos_id, compute_dtype=COMPUTE_DTYPES[cfg.model.compute_dtype], micro_prompts=micro,
        total_steps=total_steps, id_to_token=id_to_token,
        decode_attention="fast" if _env_fast_attention() else "plain",
    )
    return setup, params


def _validation_enabled(cfg) -> bool:
    return cfg.rl.eval_limit != 0


def _eval_every(cfg, total_steps: int) -> int:
    return cfg.rl.eval_every or max(1, math.ceil(total_steps / 10))


def make_loss_fn(shape, compute_dtype, remat: bool, beta: float, clip: bool, clip_eps: float):
    """loss_fn(params, micro_batch, extra) for rec.train.step: the policy loss of rec_policy_loss."""

    def loss_fn(params, mb, extra):
        del extra
        logp = completion_logprobs(
            params, shape, mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"], mb["completion_mask"],
            compute_dtype=compute_dtype, remat=remat,
        )
        loss, metrics = rec_policy_loss(
            logp, mb["ref_logp"], mb["advantages"], mb["completion_mask"], beta=beta,
            old_logp=mb["old_logp"] if clip else None, clip_eps=clip_eps, seq_weights=mb["weight"],
        )
        return loss, {"weight": mb["weight"].sum(), **metrics}

    return loss_fn


def make_score_fn(shape, compute_dtype, num_micro: int):
    """jitted (params, batch) -> [B, N] completion log-probs, computed micro-batch by micro-batch."""
    from rec.train.step import split_micro_batches

    def score(params, batch):
        keys = ("prompt_ids", "prompt_mask", "completion_ids", "completion_mask")
        micro = split_micro_batches({k: batch[k] for k in keys}, num_micro)

        def one(mb):
            return completion_logprobs(
                params, shape, mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"], mb["completion_mask"],
                compute_dtype=compute_dtype,
            )

        return unsplit_micro_batches(jax.lax.map(one, micro))

    return jax.jit(score)


def rollout(setup: _Setup, params, prompt_ids: np.ndarray, prompt_mask: np.ndarray, beams: int) -> np.ndarray:
    """Constrained beam search over the prompts in chunks of `micro_prompts`; [P, G, depth] on host."""
    from rec.decode.beam import constrained_beam_search
    from rec.dist import process_allgather, shard_batch

    chunks = []
    step = setup.micro_prompts
    for start in range(0, prompt_ids.shape[0], step):
        g_ids, g_mask = shard_batch((prompt_ids[start : start + step], prompt_mask[start : start + step]), setup.mesh)
        sids, _ = constrained_beam_search(params, setup.shape, g_ids, g_mask, setup.trie, beams,
                                          compute_dtype=setup.compute_dtype, decode_attention=setup.decode_attention)
        chunks.append(sids)
    return np.concatenate([np.asarray(process_allgather(s)) for s in chunks], axis=0)


def build_train_batch(setup: _Setup, prompt_ids, prompt_mask, sid_ids, advantages) -> dict[str, np.ndarray]:
    """Host arrays for P prompts x G completions (rows grouped by prompt)."""
    group = sid_ids.shape[1]
    comp_ids, comp_mask = completion_tokens(sid_ids, setup.newline_id, setup.eos_id, setup.pad_id)
    return {
        "prompt_ids": np.repeat(prompt_ids, group, axis=0),
        "prompt_mask": np.repeat(prompt_mask, group, axis=0),
        "completion_ids": comp_ids,
        "completion_mask": comp_mask,
        "advantages": advantages.reshape(-1).astype(np.float32),
        "weight": np.ones(comp_ids.shape[0], np.float32),
    }


@dataclass
class StepFunctions:
    """The jitted pieces of one RL step (compiled once per prompt bucket)."""

    train_step: object  # rec.train.step step: (state, batch) -> (state, metrics)
    score_fn: object  # (params, batch) -> completion log-probs [B, N]
    mix: object  # (ref, params, alpha) -> ref


def make_step_functions(setup: _Setup, optimizer, shardings, param_sh) -> StepFunctions:
    from rec.train.step import make_train_step

    rl = setup.cfg.rl
    num_micro = setup.cfg.train.batch_size // setup.micro_prompts
    loss_fn = make_loss_fn(setup.shape, setup.compute_dtype, setup.cfg.model.remat, rl.beta,
                           rl.updates_per_batch > 1, rl.clip_eps)
    return StepFunctions(
        train_step=make_train_step(loss_fn, optimizer, num_micro=num_micro, state_shardings=shardings, mesh=setup.mesh),
        score_fn=make_score_fn(setup.shape, setup.compute_dtype, num_micro),
        mix=jax.jit(mix_reference, static_argnums=2, out_shardings=param_sh),
    )


def rl_step(setup: _Setup, fns: StepFunctions, state, ref_params, step: int, prompt_ids, prompt_mask, targets):
    """Rollouts, rewards, advantages, reference log-probs and `rl.updates_per_batch` optimizer
    steps on one batch of left-padded prompts. Returns (state, ref_params, step, metrics)."""
    from rec.dist import shard_batch

    rl = setup.cfg.rl
    clip = rl.updates_per_batch > 1
    t0 = time.perf_counter()
    sid_ids = rollout(setup, state.params, prompt_ids, prompt_mask, rl.generations)
    completions = [["".join(setup.id_to_token[t] for t in beam if t >= 0) for beam in row] for row in sid_ids]
    t_rollout = time.perf_counter() - t0

    hits = sid_hits(completions, targets)
    total, terms = recommendation_rewards(hits, rl.reward, rl.reward_weights)
    advantages = compute_advantages(total, "grpo")
    batch = shard_batch(build_train_batch(setup, prompt_ids, prompt_mask, sid_ids, advantages), setup.mesh)
    batch["ref_logp"] = fns.score_fn(ref_params, batch)
    batch["old_logp"] = fns.score_fn(state.params, batch) if clip else jnp.zeros_like(batch["ref_logp"])
    t1 = time.perf_counter()
    for _ in range(rl.updates_per_batch):
        state, metrics = fns.train_step(state, batch)
        step += 1
        if rl.ref_sync_every and step % rl.ref_sync_every == 0:
            ref_params = fns.mix(ref_params, state.params, float(rl.ref_sync_alpha))
    metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
    t_update = time.perf_counter() - t1
    return state, ref_params, step, {
        **reward_metrics(total, terms, hits),
        "loss": metrics["loss"], "kl": metrics["kl"], "clip_fraction": metrics["clip_fraction"],
        "grad_norm": metrics["grad_norm"], "lr": metrics["lr"],
        "categorical_diversity": categorical_diversity(completions),
        "rollout_s": t_rollout, "update_s": t_update, "step_s": time.perf_counter() - t0,
    }


def validate(setup: _Setup, params) -> dict[str, float]:
    """HR@K / NDCG@K on the validation rows with `rl.eval_beams` constrained beams (eval prompts,
    bucketed like rec eval)."""
    from rec.eval.evaluate import ranking_metrics

    cfg = setup.cfg
    return ranking_metrics(params, setup.shape, setup.valid_rows, setup.tokenizer, setup.catalogue, setup.mesh,
                           prompt_style=cfg.eval.prompt, batch_size=cfg.eval.batch_size, beams=cfg.rl.eval_beams,
                           topk=cfg.eval.topk, pad_id=setup.pad_id, compute_dtype=setup.compute_dtype,
                           trie=setup.trie, id_to_token=setup.id_to_token)


def _meta(setup: _Setup, step: int, best: float | None) -> dict:
    return {
        "model_config": setup.shape.to_hf_config(setup.cfg.model.param_dtype),
        "stage": STAGE,
        "step": int(step),
        "best_value": best,
        "best_metric": setup.cfg.rl.best_metric,
    }


def run_rl(cfg) -> dict:
    """Run recommendation RL as configured; returns the figures merged into run_summary.json."""
    from rec import checkpoint
    from rec.dist import init_distributed, is_primary, make_mesh
    from rec.dist.preemption import PreemptionGuard
    from rec.train.common import (
        check_rollout_memory,
        check_run_dir,
        crossed_multiple,
        prepare_run_dir,
        refuse_sft_only_keys,
        resume_rollout_state,
        save_rollout_last,
    )
    from rec.train.logging import MetricsLogger, merge_run_summary
    from rec.train.optim import make_optimizer
    from rec.train.state import init_state, state_shardings

    refuse_sft_only_keys(cfg, "rl")
    check_run_dir(cfg, LAST_TAG, "RL")
    check_rl_config(cfg)
    init_distributed()
    mesh = make_mesh(cfg.mesh.shape)
    setup, params = _prepare(cfg, mesh)
    rl = cfg.rl
    prompts_per_step = cfg.train.batch_size

    optimizer = make_optimizer(cfg.train, setup.total_steps)
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    shardings = state_shardings(params, param_sh, optimizer.tx, mesh)
    state = init_state(params, optimizer.tx, cfg.run.seed, mesh)
    ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_sh)(params)
    del params
    best_value = None

    state, ref_params, meta = resume_rollout_state(cfg, LAST_TAG, state, ref_params, optimizer.tx, mesh)
    if meta is not None:
        best_value = meta.get("best_value")
        if is_primary():
            print(f"rl: resuming from {LAST_TAG} step {int(state.step)}", file=sys.stderr)

    # Prompt bucket + the completion (the SID tokens, "\n" and EOS).
    check_rollout_memory(cfg, state, setup.shape, mesh, setup.micro_prompts, rl.generations,
                         max(cfg.data.length_buckets) + setup.trie.depth + 2, ref_params=ref_params)
    prepare_run_dir(cfg, STAGE, extra={"total_steps": setup.total_steps, "num_prompts": len(setup.prompt_ids),
                                       "rollout_fast_qwen2_decode_attention": setup.decode_attention == "fast"},
                    tokenizer=setup.tokenizer)
    start_step = int(state.step)
    if is_primary():
        print(f"rl: {len(setup.prompt_ids)} prompts, {setup.total_steps} steps of {prompts_per_step} prompts x "
              f"{rl.generations} beams, reward {rl.reward}, beta {rl.beta}", file=sys.stderr)

    fns = make_step_functions(setup, optimizer, shardings, param_sh)

    logger = MetricsLogger(cfg.run.dir, STAGE, cfg, total_steps=setup.total_steps, initial_step=start_step)
    eval_every = _eval_every(cfg, setup.total_steps)
    save_every = cfg.checkpoint.every_steps or eval_every
    writer = checkpoint.Checkpointer(cfg.run.dir, async_save=cfg.checkpoint.async_save)
    last_val: dict[str, float] = {}
    last_metrics: dict[str, float] = {}
    buckets = list(cfg.data.length_buckets)
    step = start_step
    guard = PreemptionGuard()
    try:
        while step < setup.total_steps:
            indices = step_prompt_indices(step // rl.updates_per_batch, prompts_per_step, len(setup.prompt_ids),
                                          cfg.run.seed)
            token_lists = [setup.prompt_ids[i] for i in indices]
            length = bucket_length(max(len(t) for t in token_lists), buckets)
            prompt_ids, prompt_mask = left_pad_prompts(token_lists, length, setup.pad_id)
            state, ref_params, step, last_metrics = rl_step(
                setup, fns, state, ref_params, step, prompt_ids, prompt_mask, [setup.targets[i] for i in indices]
            )
            updates = rl.updates_per_batch
            do_eval = bool(setup.valid_rows) and (crossed_multiple(step, updates, eval_every) or step == setup.total_steps)
            if do_eval:
                t2 = time.perf_counter()
                last_val = validate(setup, state.params)
                last_metrics.update({f"val/{k}": v for k, v in last_val.items()})
                last_metrics["val_s"] = time.perf_counter() - t2
            logger.log(step, last_metrics)
            if do_eval and rl.best_metric:
                value = last_val[rl.best_metric]
                if best_value is None or value > best_value:
                    best_value = value
                    logger.flush()
                    writer.save(BEST_TAG, {"params": state.params}, step, _meta(setup, step, best_value))
            save_rollout_last(cfg, LAST_TAG, writer, logger, guard, step, updates, setup.total_steps, save_every, state,
                              ref_params, _meta(setup, step, best_value))
    finally:
        guard.close()
        writer.close()
        logger.close()

    figures = {"train/rl_steps": step}
    if last_metrics:
        figures.update({"train/rl_reward": last_metrics["reward"], "train/rl_hit_rate": last_metrics["hit_rate"],
                        "train/rl_kl": last_metrics["kl"]})
    figures.update({f"train/rl_val_{k}": v for k, v in last_val.items()})
    if best_value is not None:
        figures[f"train/rl_best_{rl.best_metric}"] = best_value
    merge_run_summary(cfg.run.dir, figures)
    if is_primary():
        print(f"rl: done at step {step}; checkpoints in {cfg.run.dir}/checkpoints/{LAST_TAG}", file=sys.stderr)
    return figures


# ---------------------------------------------------------------------------------------------
# rec bench rl


def bench_rl(args) -> dict:
    """Steps/s and samples/s of the RL step (beam rollouts + reference scoring + update) on random
    weights of `--shape` with the Qwen2.5 vocabulary plus the `--data` catalogue's SID tokens.

    `--batch` prompts (default 16) x `--beams` completions (pass 16 for upstream's G), next-SID
    prompts from the dataset's valid (or test) split with token counts estimated as `rec bench
    eval` does; `--fast off` runs the beam search with the plain decode attention. One warm-up step
    (reported as compile_s), then `--iters` timed steps. float32 master weights, `--dtype` compute.
    """
    from rec import dist
    from rec.bench import (
        QWEN_BASE_VOCAB,
        QWEN_EOS_ID,
        QWEN_NEWLINE_ID,
        device_facts,
        random_params,
        require_batch_divisible,
        synthetic_prompt_ids,
    )
    from rec.config import load_config
    from rec.data.dataset import available_splits, load_catalogue, read_split
    from rec.data.prompts import rl_sid_next
    from rec.decode.trie import build_trie
    from rec.model.qwen2 import get_shape, shape_with_vocab
    from rec.tokenizer import sid_tokens
    from rec.train.optim import make_optimizer
    from rec.train.state import init_state, state_shardings

    if not args.data:
        raise RecError("bench rl: --data DIR (a MiniOneRec dataset directory) is required")
    splits = available_splits(args.data)
    split = next((s for s in ("valid", "test", "train") if s in splits), "")
    if not split:
        raise RecError(f"{args.data}: no valid.csv, test.csv or train.csv to build prompts from")
    batch = args.batch or 16
    iters = max(1, args.iters)
    catalogue = load_catalogue(args.data)
    tokens = sid_tokens(catalogue)
    sid_ids = {t: QWEN_BASE_VOCAB + i for i, t in enumerate(tokens)}
    shape = get_shape(args.shape, "--shape")
    shape = shape_with_vocab(shape, max(shape.vocab_size if args.shape != "tiny" else 0, QWEN_BASE_VOCAB + len(tokens)))
    trie = build_trie([[sid_ids[t] for t in toks] for toks in catalogue.sid_tokens], QWEN_NEWLINE_ID, QWEN_EOS_ID)
    beams = min(args.beams, trie.num_sids)
    if beams < 2:
        raise RecError(f"bench rl: --beams must be at least 2, got {args.beams}")

    rows = read_split(args.data, split, limit=batch * (iters + 1))
    rng = np.random.default_rng(0)
    prompt_lists = [synthetic_prompt_ids(rl_sid_next(r.history_sids, r.item_sid).body, sid_ids, rng) for r in rows]
    targets = [r.item_sid for r in rows]
    width = int(math.ceil(max(len(p) for p in prompt_lists) / 16) * 16)  # one padded length: one compile
    mesh = dist.make_mesh("auto")
    require_batch_divisible(batch, mesh)
    fast = args.fast == "on" or (args.fast == "auto" and _env_fast_attention())
    cfg = load_config(None, [f"train.batch_size={batch}", f"train.steps={iters + 1}", "train.lr=1.0e-5",
                             "train.warmup_steps=1", f"rl.generations={beams}", f"model.compute_dtype={args.dtype}",
                             "model.remat=true"])
    setup = _Setup(
        cfg=cfg, mesh=mesh, shape=shape, tokenizer=None, trie=trie, catalogue=catalogue, prompt_ids=prompt_lists,
        targets=targets, valid_rows=[], pad_id=QWEN_EOS_ID, newline_id=QWEN_NEWLINE_ID, eos_id=QWEN_EOS_ID,
        compute_dtype=COMPUTE_DTYPES[args.dtype], micro_prompts=batch, total_steps=iters + 1,
        id_to_token={i: t for t, i in sid_ids.items()}, decode_attention="fast" if fast else "plain",
    )
    params = random_params(shape, jnp.float32, mesh)
    optimizer = make_optimizer(cfg.train, setup.total_steps)
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    state = init_state(params, optimizer.tx, 0, mesh)
    ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_sh)(params)
    del params
    fns = make_step_functions(setup, optimizer, state_shardings(state.params, param_sh, optimizer.tx, mesh), param_sh)

    def one_step(state, ref_params, step, it):
        chosen = [(it * batch + j) % len(prompt_lists) for j in range(batch)]
        ids, mask = left_pad_prompts([prompt_lists[i] for i in chosen], width, QWEN_EOS_ID)
        return rl_step(setup, fns, state, ref_params, step, ids, mask, [targets[i] for i in chosen])

    start = time.perf_counter()
    state, ref_params, step, _ = one_step(state, ref_params, 0, 0)
    compile_s = time.perf_counter() - start
    rollout_s = update_s = 0.0
    start = time.perf_counter()
    for it in range(1, iters + 1):
        state, ref_params, step, metrics = one_step(state, ref_params, step, it)
        rollout_s += metrics["rollout_s"]
        update_s += metrics["update_s"]
    elapsed = time.perf_counter() - start
    return {
        "bench": "rl",
        "shape": args.shape,
        "prompts_per_step": batch,
        "beams": beams,
        "iters": iters,
        "steps_per_s": round(iters / elapsed, 4),
        "samples_per_s": round(iters * batch * beams / elapsed, 2),  # completions (prompt x beam) per second
        "prompts_per_s": round(iters * batch / elapsed, 3),
        "rollout_s_per_step": round(rollout_s / iters, 4),
        "update_s_per_step": round(update_s / iters, 4),
        "compile_s": round(compile_s, 2),
        "fast_decode_attention": fast,
        "prompt_len_padded": width,
        "prompt_tokens": "estimated (Qwen2 pre-tokenizer rule, synthetic ids)",
        "data": str(args.data),
        "split": split,
        "vocab": shape.vocab_size,
        "dtype": args.dtype,
        "param_dtype": "float32",
        **device_facts(),
    }


def _env_fast_attention() -> bool:
    from rec.decode.sampling import rollout_fast_paths

    return rollout_fast_paths("auto", "auto")[1]
