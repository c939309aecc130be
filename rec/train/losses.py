"""Policy-gradient losses for recommendation RL and GSM8K GRPO, and the per-token log-probs they use.

All inputs are per-token arrays [B, N] over the N completion positions of B sequences, with a
0/1 `mask` of real completion tokens, and per-sequence advantages [B].

- `k3_kl`: the k3 estimator of KL(policy || reference) per token,
  exp(ref - logp) - (ref - logp) - 1 (>= 0, unbiased for the KL under policy samples).
- `rec_policy_loss` (upstream MiniOneRec/TRL GRPO): per token -(ratio * A - beta * KL), averaged
  over each sequence's tokens, then over sequences. With one update per rollout batch the ratio
  is exp(logp - stop_gradient(logp)) = 1 in value, so the gradient is the plain A * grad(logp);
  with several updates the ratio is taken against the rollout-time log-probs and clipped PPO-style
  to [1 - eps, 1 + eps].
- `ppo_clip_loss` (GSM8K): -min(ratio * A, clip(ratio, 1 - low, 1 + high) * A) (+ beta * KL),
  summed over tokens and divided by the token count of the whole optimizer batch, so micro-batches
  of different token counts add up to one token mean.

`completion_logprobs` runs the model over prompt + completion and returns the full-vocabulary
log-softmax (temperature 1, no trie mask: upstream semantics) of each completion token, computing
logits in chunks of completion positions so [B, N, V] f32 logits never exist at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def k3_kl(logp: jax.Array, ref_logp: jax.Array) -> jax.Array:
    delta = ref_logp - logp
    return jnp.exp(delta) - delta - 1.0


def sequence_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """[B, N] -> [B]: mean over each row's masked tokens (0 for rows without tokens)."""
    mask = mask.astype(values.dtype)
    return (values * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)


def _weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
    return (values * weights).sum() / jnp.maximum(weights.sum(), 1e-9)


def rec_policy_loss(
    logp: jax.Array,
    ref_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    beta: float,
    old_logp: jax.Array | None = None,
    clip_eps: float = 0.2,
    seq_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean per sequence, then mean over sequences (weighted by `seq_weights`, 0 for
    padding rows). `old_logp=None`: ratio identically 1 (one update per rollout batch);
    otherwise PPO clipping against `old_logp`. Returns (loss, metrics)."""
    mask = mask.astype(jnp.float32)
    weights = jnp.ones(logp.shape[0], jnp.float32) if seq_weights is None else seq_weights.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]
    if old_logp is None:
        ratio = jnp.exp(logp - jax.lax.stop_gradient(logp))
        surrogate = ratio * adv
        clipped_fraction = jnp.zeros((), jnp.float32)
    else:
        ratio = jnp.exp(logp - old_logp)
        clipped_ratio = jnp.clip(ratio, 1.0 - clip_eps, 1.0 + clip_eps)
        surrogate = jnp.minimum(ratio * adv, clipped_ratio * adv)
        clipped = (ratio * adv > clipped_ratio * adv).astype(jnp.float32)
        clipped_fraction = _weighted_mean(sequence_mean(clipped, mask), weights)
    kl = k3_kl(logp, ref_logp)
    per_token = -(surrogate - beta * kl)
    loss = _weighted_mean(sequence_mean(per_token, mask), weights)
    metrics = {
        "kl": _weighted_mean(sequence_mean(kl, mask), weights),
        "clip_fraction": clipped_fraction,
    }
    return loss, metrics


def ppo_clip_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float,
    clip_high: float,
    total_tokens: jax.Array | float,
    beta: float = 0.0,
    ref_logp: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Asymmetric PPO clip, summed over masked tokens / `total_tokens` (the whole optimizer
    batch's token count, so micro-batch losses add up to the batch token mean)."""
    mask = mask.astype(jnp.float32)
    adv = advantages.astype(jnp.float32)[:, None]
    ratio = jnp.exp(logp - old_logp)
    clipped_ratio = jnp.clip(ratio, 1.0 - clip_low, 1.0 + clip_high)
    per_token = -jnp.minimum(ratio * adv, clipped_ratio * adv)
    metrics = {}
    if beta and ref_logp is not None:
        kl = k3_kl(logp, ref_logp)
        per_token = per_token + beta * kl
        metrics["kl_sum"] = (kl * mask).sum()
    denom = jnp.maximum(jnp.asarray(total_tokens, jnp.float32), 1.0)
    loss = (per_token * mask).sum() / denom
    metrics["clip_sum"] = ((ratio * adv > clipped_ratio * adv).astype(jnp.float32) * mask).sum()
    return loss, metrics


def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[targets] in f32: [B, N, V], [B, N] -> [B, N]."""
    logits = logits.astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1)


def completion_logprobs(
    params,
    shape,
    prompt_ids: jax.Array,
    prompt_mask: jax.Array,
    completion_ids: jax.Array,
    completion_mask: jax.Array,
    *,
    compute_dtype=jnp.bfloat16,
    remat: bool = False,
    chunk: int = 128,
) -> jax.Array:
    """f32 [B, N] log-probs of `completion_ids` after left-padded `prompt_ids` (full vocabulary,
    temperature 1). Completion padding (mask 0) gets 0; callers mask it anyway."""
    from rec.model.qwen2 import forward, logits_from_hidden, positions_from_mask
    from rec.train.step import IGNORE_INDEX, chunked_token_logprobs

    prompt_len = prompt_ids.shape[1]
    num_new = completion_ids.shape[1]
    tokens = jnp.concatenate([prompt_ids, completion_ids], axis=1)
    mask = jnp.concatenate([prompt_mask, completion_mask], axis=1).astype(jnp.int32)
    hidden, _ = forward(
        params, shape, tokens, positions_from_mask(mask), mask,
        compute_dtype=compute_dtype, remat=remat, return_hidden=True,
    )
    # The hidden state at position t predicts token t + 1: completion token j is predicted at
    # prompt_len - 1 + j.
    hidden = hidden[:, prompt_len - 1 : prompt_len - 1 + num_new]
    targets = jnp.where(completion_mask.astype(bool), completion_ids, IGNORE_INDEX)
    return chunked_token_logprobs(hidden, targets, lambda h: logits_from_hidden(params, shape, h), chunk)
