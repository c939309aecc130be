"""Trie-constrained beam search over semantic IDs, as one jitted program per (B, T, K) shape.

Semantics are upstream MiniOneRec's (reference/minionerec-upstream.md §7.2-7.3, §11.5), i.e. what
`transformers` beam search returns with a trie-masking logits processor, length penalty 0:

* every step scores the fp32 log-softmax over the FULL vocabulary of the model logits; only tokens
  the trie allows are candidates, and their log-probs are not renormalised over the allowed set;
* the forced "\\n" and EOS steps are scored like any other step (they are trie levels here);
* HF pruning: at each step take the top 2K candidates over (running beams x allowed tokens);
  candidates ending in EOS (or hitting the length limit) among the first K of those are finished
  and merged into a K-slot finished set by score; the best K non-finished ones keep running;
  at step 0 only beam 0 is live;
* the result is the finished set, best first: K distinct valid SIDs whenever the catalogue has at
  least K. Slots that cannot be filled (fewer SIDs than beams) have score -inf and token ids -1.

Where upstream (HF) masks disallowed tokens with -1e6 and so lets "filler" beams wander off the
trie when a level has fewer than K continuations, we give them -inf: they rank below every valid
candidate in both, so the valid results are the same, and ours can never leak an invalid SID.

Shape discipline: the prompt is prefilled once per prompt (left padded, positions = cumsum(mask)-1),
its KV cache padded on device and broadcast to K beam rows; then `trie.num_steps` (depth + 2)
unrolled decode steps feed one token per beam row. Reordering beams only gathers the decode slots of
the cache (the prompt slots are identical across a prompt's beams). No host round trip.
"""

from __future__ import annotations

import collections
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rec.decode.trie import SidTrie

NEG_INF = float("-inf")

# Incremented each time the jitted search is traced (a compile); tests use it to check reuse.
TRACE_COUNTS: collections.Counter = collections.Counter()

# step_fn(state, parent[B,K] beam index within its prompt, tokens[B*K], step) -> (logits[B*K,V] f32, state)
StepFn = Callable[[Any, jax.Array, jax.Array, int], tuple[jax.Array, Any]]


def beam_search_core(first_logits: jax.Array, step_fn: StepFn, state: Any, trie: SidTrie, beams: int):
    """The trie-constrained beam search given a next-token logits oracle; traceable, shapes static.

    first_logits: [B, V] f32 logits of the first generated token (after the prompt). Log-probs are
      the full-vocabulary log-softmax of these (and of step_fn's logits), computed here.
    step_fn: advances every beam row by one fed token; it must first reorder its per-row state by
      `parent` (row b*K+k continues the beam that was row b*K+parent[b,k]).
    state: the step function's per-row state with B*K rows (beam rows of a prompt start identical).
    Returns (path_tokens[B,K,num_steps] int32, scores[B,K] f32), best first; unfilled slots -inf/-1.
    """
    batch, vocab = first_logits.shape
    k = beams
    num_steps = trie.num_steps

    run_score = jnp.full((batch, k), NEG_INF, jnp.float32).at[:, 0].set(0.0)  # only beam 0 is live at first
    node = jnp.zeros((batch, k), jnp.int32)
    hist = jnp.full((batch, k, num_steps), -1, jnp.int32)
    fin_score = jnp.full((batch, k), NEG_INF, jnp.float32)
    fin_hist = jnp.full((batch, k, num_steps), -1, jnp.int32)
    logits = first_logits[:, None, :]  # [B, 1, V]: every beam of a prompt starts from the prompt's logits
    parent = jnp.zeros((batch, k), jnp.int32)
    feed = jnp.zeros((batch * k,), jnp.int32)

    for step in range(num_steps):
        if step > 0:
            flat_logits, state = step_fn(state, parent, feed, step)
            logits = flat_logits.reshape(batch, k, vocab)
        cand_tok = trie.child_tokens[step][node]  # [B, K, M]: the allowed set of each beam
        cand_next = trie.child_next[step][node]
        fanout = cand_tok.shape[-1]
        # Full-vocabulary log-softmax, evaluated only at the candidates: logit - logsumexp(all logits).
        log_norm = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1, keepdims=True)
        # (At step 0 `logits` has one row per prompt: gather all K beams' candidates from it.)
        gather_idx = jnp.maximum(cand_tok, 0).reshape(batch, logits.shape[1], -1)
        cand_logits = jnp.take_along_axis(logits, gather_idx, axis=-1).reshape(cand_tok.shape)
        tok_logp = cand_logits.astype(jnp.float32) - log_norm
        cand_score = jnp.where(cand_tok >= 0, run_score[..., None] + tok_logp, NEG_INF)

        # HF: top 2K over beams x tokens (padded with -inf when fewer candidates exist).
        flat = cand_score.reshape(batch, k * fanout)
        if k * fanout < 2 * k:
            flat = jnp.pad(flat, ((0, 0), (0, 2 * k - k * fanout)), constant_values=NEG_INF)
        top_score, top_idx = jax.lax.top_k(flat, 2 * k)
        top_idx = jnp.minimum(top_idx, k * fanout - 1)  # padded slots carry -inf; any index will do
        top_beam = top_idx // fanout
        top_tok = jnp.take_along_axis(cand_tok.reshape(batch, -1), top_idx, axis=1)
        top_next = jnp.take_along_axis(cand_next.reshape(batch, -1), top_idx, axis=1)
        top_hist = jnp.take_along_axis(hist, top_beam[..., None], axis=1).at[:, :, step].set(top_tok)
        live = top_score > NEG_INF
        ends = (top_tok == trie.eos_id) | (step == num_steps - 1)  # EOS, or the length limit (HF max_length)

        # Finished: ending candidates among the first K of the 2K, merged into the K-slot set.
        new_fin = jnp.where(ends[:, :k] & live[:, :k], top_score[:, :k], NEG_INF)
        merged_score = jnp.concatenate([fin_score, new_fin], axis=1)
        merged_hist = jnp.concatenate([fin_hist, top_hist[:, :k]], axis=1)
        fin_score, pick = jax.lax.top_k(merged_score, k)
        fin_hist = jnp.take_along_axis(merged_hist, pick[..., None], axis=1)

        if step == num_steps - 1:
            break
        # Running: the best K non-ending candidates of the 2K.
        run_score, pos = jax.lax.top_k(jnp.where(ends, NEG_INF, top_score), k)
        alive = run_score > NEG_INF
        parent = jnp.take_along_axis(top_beam, pos, axis=1)
        run_tok = jnp.where(alive, jnp.take_along_axis(top_tok, pos, axis=1), -1)
        node = jnp.where(alive, jnp.take_along_axis(top_next, pos, axis=1), 0)
        hist = jnp.where(alive[..., None], jnp.take_along_axis(top_hist, pos[..., None], axis=1), -1)
        feed = jnp.maximum(run_tok, 0).reshape(-1)  # dead rows feed token 0; their results are discarded

    fin_hist = jnp.where((fin_score > NEG_INF)[..., None], fin_hist, -1)
    return fin_hist, fin_score


def path_to_sid_tokens(path_tokens: jax.Array, trie: SidTrie) -> jax.Array:
    """[.., num_steps] generated paths -> [.., depth] SID token ids (-1 after a shorter SID)."""
    sid = path_tokens[..., : trie.max_sid_len]
    return jnp.where((sid == trie.newline_id) | (sid == trie.eos_id), -1, sid)


# ---------------------------------------------------------------------------------------------
# The model-backed search.


def _model_api():
    from rec.model import qwen2  # noqa: PLC0415 (the model imports jax/flax; keep decode import light)

    return qwen2


def prefill(params, shape, prompt_ids, prompt_mask, extra_slots: int, *, compute_dtype, cache_dtype=None):
    """Run the left-padded prompts once; return (last-token logits [B,Vpad] f32, cache padded by
    `extra_slots` decode slots, prompt lengths [B]). Traceable."""
    qwen2 = _model_api()
    batch, length = prompt_ids.shape
    mask = prompt_mask.astype(jnp.int32)
    positions = jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0)
    cache = qwen2.init_cache(shape, batch, length, cache_dtype or compute_dtype)
    hidden, cache = qwen2.forward(params, shape, prompt_ids, positions, mask, cache=cache, cache_index=0,
                                  compute_dtype=compute_dtype, decode_attention="plain", return_hidden=True)
    # Only the last column is needed (left padding puts every prompt's last token there); projecting
    # just it avoids a [B, T, V] f32 logits buffer.
    logits = qwen2.logits_from_hidden(params, shape, hidden[:, -1:, :])[:, 0].astype(jnp.float32)
    cache = {name: jnp.pad(c, ((0, 0), (0, 0), (0, extra_slots)) + ((0, 0),) * (c.ndim - 3))
             for name, c in cache.items()}
    return logits, cache, mask.sum(axis=-1)


def _reorder_decode_slots(cache, parent, start: int, count: int, beams: int):
    """Gather the `count` decode slots from `start` of each beam row from its parent beam row."""
    if count == 0:
        return cache
    out = {}
    for name, c in cache.items():
        layers, rows = c.shape[:2]
        tail = jax.lax.dynamic_slice_in_dim(c, start, count, axis=2)
        tail = tail.reshape(layers, rows // beams, beams, *tail.shape[2:])
        idx = parent.reshape(1, rows // beams, beams, *([1] * (tail.ndim - 3)))
        tail = jnp.take_along_axis(tail, idx, axis=2).reshape(layers, rows, *tail.shape[3:])
        out[name] = jax.lax.dynamic_update_slice_in_dim(c, tail, start, axis=2)
    return out


def _search_impl(params, prompt_ids, prompt_mask, trie, *, shape, beams, compute_dtype, decode_attention):
    TRACE_COUNTS["constrained_beam_search"] += 1
    qwen2 = _model_api()
    batch, length = prompt_ids.shape
    k = beams
    decode_slots = trie.num_steps - 1  # the last (EOS) token is scored, never fed
    logits, cache, prompt_len = prefill(params, shape, prompt_ids, prompt_mask, decode_slots,
                                        compute_dtype=compute_dtype)
    # Broadcast the prompt KV to the K beam rows of each prompt (computed once per prompt).
    cache = {name: jnp.repeat(c, k, axis=1) for name, c in cache.items()}
    mask = jnp.concatenate([prompt_mask.astype(jnp.int32), jnp.zeros((batch, decode_slots), jnp.int32)], axis=1)
    mask = jnp.repeat(mask, k, axis=0)
    row_len = jnp.repeat(prompt_len, k)

    def step_fn(state, parent, tokens, step):
        cache, mask = state
        cache = _reorder_decode_slots(cache, parent, length, step - 1, k)
        slot = length + step - 1
        mask = mask.at[:, slot].set(1)  # decode slots are valid for every row alike: no reorder needed
        positions = (row_len + step - 1)[:, None]
        logits, cache = qwen2.forward(params, shape, tokens[:, None], positions, mask, cache=cache,
                                      cache_index=slot, compute_dtype=compute_dtype,
                                      decode_attention=decode_attention)
        return logits[:, 0], (cache, mask)

    paths, scores = beam_search_core(logits, step_fn, (cache, mask), trie, k)
    return path_to_sid_tokens(paths, trie), scores


_search_jit = jax.jit(_search_impl, static_argnames=("shape", "beams", "compute_dtype", "decode_attention"))


def constrained_beam_search(params, shape, prompt_ids, prompt_mask, trie: SidTrie, beams: int, *,
                            compute_dtype=jnp.bfloat16, decode_attention: str = "fast"):
    """Top-`beams` catalogue SIDs per prompt, best first (see module docstring for the semantics).

    prompt_ids/prompt_mask: [B, T] left-padded prompts (the caller buckets T to a few lengths:
    the program compiles once per (B, T, beams) and trie table shapes).
    Returns (sid_token_ids [B, K, depth] int32, -1 past a shorter SID; scores [B, K] f32).
    """
    if decode_attention not in ("fast", "plain"):
        raise ValueError(f"decode_attention must be 'fast' or 'plain', not {decode_attention!r}")
    if beams < 1:
        raise ValueError(f"beams must be >= 1, got {beams}")
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    if prompt_ids.ndim != 2 or prompt_ids.shape != prompt_mask.shape:
        raise ValueError(f"prompt_ids {prompt_ids.shape} and prompt_mask {prompt_mask.shape} must both be [B, T]")
    return _search_jit(params, prompt_ids, prompt_mask, trie, shape=shape, beams=int(beams),
                       compute_dtype=jnp.dtype(compute_dtype), decode_attention=decode_attention)


def decode_sids(tokenizer_or_id_to_token, sid_token_ids) -> list[list[str]]:
    """[B, K, depth] SID token ids -> per prompt, K SID strings like "<a_1><b_2><c_3>".

    Accepts a tokenizer (``convert_ids_to_tokens``), a mapping id -> token, a sequence indexed by id,
    or a callable. Ids < 0 (past a shorter SID, or an unfilled slot) are skipped.
    """
    to_token = _id_lookup(tokenizer_or_id_to_token)
    ids = np.asarray(sid_token_ids)
    return [["".join(to_token(int(t)) for t in beam if t >= 0) for beam in row] for row in ids]


def _id_lookup(obj) -> Callable[[int], str]:
    if hasattr(obj, "convert_ids_to_tokens"):
        return functools.lru_cache(maxsize=None)(lambda i: obj.convert_ids_to_tokens(i))
    if isinstance(obj, Mapping):
        return obj.__getitem__
    if isinstance(obj, Sequence):
        return obj.__getitem__
    if callable(obj):
        return obj
    raise TypeError(f"expected a tokenizer, mapping, sequence or callable, not {type(obj).__name__}")
