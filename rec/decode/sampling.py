"""Sampling generation for GSM8K GRPO rollouts: temperature + top-p (nucleus), or greedy.

Two drivers with identical outputs for the same inputs and rng:

* fast (``ROLLOUT_FAST_GENERATE``, the default): prefill, pad the KV cache on device to
  prompt_len + max_new_tokens, then the whole decode as ONE jitted ``lax.while_loop`` that stops as
  soon as every row has emitted EOS or the budget is spent. Compiled once per (B, T, N) shape.
* plain: a Python loop over a jitted one-token step that asks the host "all done?" after every
  token (the baseline users had before the fast path; one device->host sync per token).

``fast_attention`` picks the model's decode-specialised attention (``decode_attention="fast"``,
``ROLLOUT_FAST_QWEN2_DECODE_ATTENTION``) for the one-token steps. Sampling math lives in pure
functions (`top_p_filter`, `sample_next_token`) that are tested on their own.

Outputs: ``completion_ids [B, N]`` (``pad_id`` after a row's EOS), ``completion_mask [B, N]`` (1 up
to and including the EOS), ``lengths [B]`` (generated tokens, EOS included).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp

from rec.decode.beam import prefill

# Traces (compiles) per driver; tests check that a second call of the same shape does not retrace.
TRACE_COUNTS: collections.Counter = collections.Counter()


def top_p_filter(logits: jax.Array, top_p) -> jax.Array:
    """Keep the smallest set of highest-probability tokens whose mass reaches `top_p`; -inf elsewhere.

    logits [..., V] f32 (already temperature-scaled). A token is kept when the probability mass of
    the tokens ranked strictly above it is below `top_p`, so the top token is always kept and
    top_p >= 1 keeps everything. Ties at the cut-off are all kept.
    """
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    # top_p >= 1 keeps everything even where the f32 cumulative sum rounds past 1.
    keep_sorted = (mass_before < top_p) | (jnp.asarray(top_p) >= 1.0)
    keep_sorted = keep_sorted.at[..., 0].set(True)
    # The cut-off is the smallest kept logit: everything at least as large is in the nucleus.
    cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= cutoff, logits, -jnp.inf)


def sample_next_token(logits: jax.Array, key: jax.Array, temperature, top_p, greedy: bool = False) -> jax.Array:
    """Next token ids [B] from f32 logits [B, V]: argmax when `greedy` or temperature <= 0, else
    nucleus sampling from softmax(logits / temperature)."""
    best = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if greedy:
        return best
    temperature = jnp.asarray(temperature, jnp.float32)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    # top_p >= 1 is the common setting: skip the full-vocabulary sort then.
    filtered = jax.lax.cond(jnp.asarray(top_p) >= 1.0, lambda x: x, lambda x: top_p_filter(x, top_p), scaled)
    sampled = jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)
    return jnp.where(temperature > 0, sampled, best)


def completion_mask_from_tokens(tokens: jax.Array, eos_id: int) -> tuple[jax.Array, jax.Array]:
    """(mask [B,N] int32: 1 up to and including the first EOS, lengths [B])."""
    is_eos = tokens == eos_id
    eos_before = jnp.cumsum(is_eos, axis=-1) - is_eos  # EOS strictly before this position
    mask = (eos_before == 0).astype(jnp.int32)
    return mask, mask.sum(axis=-1)


# ---------------------------------------------------------------------------------------------
# Drivers. State: (step i, tokens [B,N], done [B], cache, cache mask [B,T+N]). Token i is sampled
# from the logits after feeding token i-1; token 0 comes from the prefill logits.


def _prefill_and_first(params, prompt_ids, prompt_mask, rng, temperature, top_p, eos_id, pad_id, *, shape,
                       max_new_tokens, greedy, compute_dtype):
    batch, length = prompt_ids.shape
    logits, cache, prompt_len = prefill(params, shape, prompt_ids, prompt_mask, max_new_tokens,
                                        compute_dtype=compute_dtype)
    first = sample_next_token(logits, jax.random.fold_in(rng, 0), temperature, top_p, greedy)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.zeros((batch, max_new_tokens), jnp.int32)], axis=1)
    return (jnp.int32(1), tokens, first == eos_id, cache, mask), prompt_len


def _decode_step(params, state, prompt_len, rng, temperature, top_p, eos_id, pad_id, *, shape, prompt_width,
                 greedy, compute_dtype, decode_attention):
    """Feed token i-1 of every row, sample token i. Finished rows keep emitting pad."""
    from rec.model import qwen2  # noqa: PLC0415

    i, tokens, done, cache, mask = state
    prev = jax.lax.dynamic_index_in_dim(tokens, i - 1, axis=1, keepdims=False)
    slot = prompt_width + i - 1
    mask = jax.lax.dynamic_update_index_in_dim(mask, jnp.ones((mask.shape[0],), mask.dtype), slot, axis=1)
    positions = (prompt_len + i - 1)[:, None]
    logits, cache = qwen2.forward(params, shape, prev[:, None], positions, mask, cache=cache, cache_index=slot,
                                  compute_dtype=compute_dtype, decode_attention=decode_attention)
    nxt = sample_next_token(logits[:, 0].astype(jnp.float32), jax.random.fold_in(rng, i), temperature, top_p, greedy)
    nxt = jnp.where(done, pad_id, nxt)
    tokens = jax.lax.dynamic_update_index_in_dim(tokens, nxt, i, axis=1)
    return (i + 1, tokens, done | (nxt == eos_id), cache, mask)


def _fast_impl(params, prompt_ids, prompt_mask, rng, temperature, top_p, eos_id, pad_id, *, shape, max_new_tokens,
               greedy, compute_dtype, decode_attention):
    TRACE_COUNTS["fast"] += 1
    statics = dict(shape=shape, greedy=greedy, compute_dtype=compute_dtype)
    state, prompt_len = _prefill_and_first(params, prompt_ids, prompt_mask, rng, temperature, top_p, eos_id, pad_id,
                                           max_new_tokens=max_new_tokens, **statics)

    def cond(state):
        i, _, done, _, _ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        return _decode_step(params, state, prompt_len, rng, temperature, top_p, eos_id, pad_id,
                            prompt_width=prompt_ids.shape[1], decode_attention=decode_attention, **statics)

    steps, tokens, _, _, _ = jax.lax.while_loop(cond, body, state)
    mask, lengths = completion_mask_from_tokens(tokens, eos_id)
    return tokens, mask, lengths, steps


_STATICS = ("shape", "max_new_tokens", "greedy", "compute_dtype")
_fast_jit = jax.jit(_fast_impl, static_argnames=_STATICS + ("decode_attention",))


def _counted(name, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        TRACE_COUNTS[name] += 1
        return fn(*args, **kwargs)

    return wrapper


_prefill_jit = jax.jit(_counted("plain_prefill", _prefill_and_first), static_argnames=_STATICS)
# The cache in the state is donated where the backend supports it so each step updates it in place
# (CPU ignores donation with a warning, so it is skipped there).
_step_jit_by_donation = {
    donate: jax.jit(_counted("plain_step", _decode_step),
                    static_argnames=("shape", "prompt_width", "greedy", "compute_dtype", "decode_attention"),
                    donate_argnums=(1,) if donate else ())
    for donate in (False, True)
}


def generate(params, shape, prompt_ids, prompt_mask, rng, *, temperature=1.0, top_p=1.0, max_new_tokens: int,
             eos_id: int, pad_id: int, greedy: bool = False, fast_generate: bool = True,
             fast_attention: bool = True, compute_dtype=jnp.bfloat16, return_steps: bool = False):
    """Sample up to `max_new_tokens` tokens after left-padded prompts [B, T].

    Returns (completion_ids [B, N], completion_mask [B, N], lengths [B]) with N = max_new_tokens;
    see the module docstring for the two drivers (same results for the same rng). With
    `return_steps`, also the number of token positions actually generated (int): the loop stops
    once every row has emitted EOS, so this is max(lengths) unless the budget ran out.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must both be [B, T]")
    # Sampling knobs and token ids are traced, so changing them never recompiles.
    knobs = (jnp.float32(temperature), jnp.float32(top_p), jnp.int32(eos_id), jnp.int32(pad_id))
    statics = dict(shape=shape, max_new_tokens=int(max_new_tokens), greedy=bool(greedy),
                   compute_dtype=jnp.dtype(compute_dtype))
    decode_attention = "fast" if fast_attention else "plain"
    if fast_generate:
        tokens, mask, lengths, steps = _fast_jit(params, prompt_ids, prompt_mask, rng, *knobs,
                                                 decode_attention=decode_attention, **statics)
        return (tokens, mask, lengths, int(steps)) if return_steps else (tokens, mask, lengths)

    state, prompt_len = _prefill_jit(params, prompt_ids, prompt_mask, rng, *knobs, **statics)
    step = _step_jit_by_donation[jax.default_backend() != "cpu"]
    step_statics = dict(statics, prompt_width=prompt_ids.shape[1], decode_attention=decode_attention)
    del step_statics["max_new_tokens"]
    for _ in range(1, statics["max_new_tokens"]):
        if bool(jnp.all(state[2])):  # the per-token host sync the fast path removes
            break
        state = step(params, state, prompt_len, rng, *knobs, **step_statics)
    tokens = state[1]
    mask, lengths = completion_mask_from_tokens(tokens, int(eos_id))
    return (tokens, mask, lengths, int(state[0])) if return_steps else (tokens, mask, lengths)


FAST_GENERATE_ENV = "ROLLOUT_FAST_GENERATE"
FAST_ATTENTION_ENV = "ROLLOUT_FAST_QWEN2_DECODE_ATTENTION"


def rollout_fast_paths(fast_generate: str = "auto", fast_decode_attention: str = "auto") -> tuple[bool, bool]:
    """(fast_generate, fast_attention) for a rollout: on by default; the environment variables
    ROLLOUT_FAST_GENERATE / ROLLOUT_FAST_QWEN2_DECODE_ATTENTION win when set ("0" = off); otherwise
    the config settings ("auto" | "on" | "off", `grpo.fast_generate` / `grpo.fast_decode_attention`)."""
    from rec.config import env_flag  # noqa: PLC0415

    return env_flag(FAST_GENERATE_ENV, fast_generate), env_flag(FAST_ATTENTION_ENV, fast_decode_attention)
