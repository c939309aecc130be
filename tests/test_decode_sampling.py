"""Sampling generate: nucleus/temperature math, fast (while_loop) vs plain (host loop) drivers,
fast decode attention within bf16 tolerance, completion masks, no recompilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from rec.decode.sampling import (
    TRACE_COUNTS,
    completion_mask_from_tokens,
    generate,
    sample_next_token,
    top_p_filter,
)

EOS, PAD = 1, 0

_top_p_jit = jax.jit(top_p_filter)


@settings(max_examples=60, deadline=None)
@given(
    logits=st.lists(st.floats(-6, 6, allow_nan=False, width=32), min_size=12, max_size=12, unique=True),
    top_p=st.floats(0.01, 1.0),
)
def test_top_p_keeps_the_smallest_set_reaching_p(logits, top_p):
    logits = np.asarray(logits, np.float32)
    assume(np.diff(np.sort(logits)).min() > 1e-3)  # ties at the cut-off are all kept: tested by hand below
    kept = np.isfinite(np.asarray(_top_p_jit(jnp.asarray(logits)[None], jnp.float32(top_p)))[0])
    probs = np.exp(logits.astype(np.float64) - logits.max())
    probs /= probs.sum()
    # The kept tokens are the most probable ones...
    assert kept.any()
    assert probs[kept].min() > probs[~kept].max(initial=-1.0)
    # ...their mass reaches p, and without the least probable of them it would not.
    assert probs[kept].sum() >= top_p - 1e-5
    assert probs[kept].sum() - probs[kept].min() < top_p + 1e-5


def test_top_p_by_hand():
    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    assert np.isfinite(np.asarray(top_p_filter(logits, 0.5))).tolist() == [[True, False, False, False]]
    assert np.isfinite(np.asarray(top_p_filter(logits, 0.51))).tolist() == [[True, True, False, False]]
    assert np.isfinite(np.asarray(top_p_filter(logits, 0.9))).tolist() == [[True, True, True, False]]
    assert np.isfinite(np.asarray(top_p_filter(logits, 1.0))).all()
    tied = jnp.log(jnp.array([[0.4, 0.2, 0.2, 0.2]]))
    assert np.isfinite(np.asarray(top_p_filter(tied, 0.5))).tolist() == [[True, True, True, True]]
    # Padded vocabulary rows (-inf) stay out and do not break the cut-off.
    padded = jnp.concatenate([logits, jnp.full((1, 2), -jnp.inf)], axis=1)
    assert np.isfinite(np.asarray(top_p_filter(padded, 1.0))).tolist() == [[True] * 4 + [False] * 2]


def test_sampling_frequencies_and_low_temperature():
    logits = jnp.log(jnp.array([0.6, 0.25, 0.1, 0.05]))
    rows = jnp.broadcast_to(logits, (20000, 4))
    draws = np.asarray(sample_next_token(rows, jax.random.PRNGKey(0), 1.0, 1.0))
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.6, 0.25, 0.1, 0.05], atol=0.015)
    # top_p = 0.8 renormalises over {0.6, 0.25}
    draws = np.asarray(sample_next_token(rows, jax.random.PRNGKey(1), 1.0, 0.8))
    freq = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(freq, [0.6 / 0.85, 0.25 / 0.85, 0, 0], atol=0.015)
    # temperature -> 0 approaches greedy; 0 is exactly greedy; so is greedy=True
    random_logits = jax.random.normal(jax.random.PRNGKey(2), (64, 50)) * 2
    best = np.asarray(jnp.argmax(random_logits, axis=-1))
    for temperature in (1e-4, 0.0):
        got = np.asarray(sample_next_token(random_logits, jax.random.PRNGKey(3), temperature, 1.0))
        np.testing.assert_array_equal(got, best)
    np.testing.assert_array_equal(np.asarray(sample_next_token(random_logits, None, 1.0, 1.0, greedy=True)), best)


def test_completion_mask_by_hand():
    tokens = jnp.array([[5, 6, EOS, PAD, PAD], [5, 6, 7, 8, 9], [EOS, PAD, PAD, PAD, PAD]])
    mask, lengths = completion_mask_from_tokens(tokens, EOS)
    assert np.asarray(mask).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert np.asarray(lengths).tolist() == [3, 5, 1]


# ---------------------------------------------------------------------------------------------
# generate() on a tiny random Qwen2 (vocab padded beyond its true size).


@pytest.fixture(scope="module")
def tiny():
    from rec.model import qwen2

    shape = qwen2.shape_with_vocab(qwen2.SHAPES["tiny"], 100)
    params = qwen2.init_params(shape, jax.random.PRNGKey(0), jnp.float32, vocab_multiple=64)
    rng = np.random.default_rng(0)
    lengths = [5, 9, 7, 3]
    width = max(lengths)
    ids = np.full((len(lengths), width), PAD, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rng.integers(3, 100, size=n)
        mask[i, width - n:] = 1
    return qwen2, shape, params, ids, mask


def run(tiny, **kwargs):
    _, shape, params, ids, mask = tiny
    kwargs = {"max_new_tokens": 10, "eos_id": EOS, "pad_id": PAD, "compute_dtype": jnp.float32,
              "fast_attention": False, **kwargs}
    return [np.asarray(x) for x in generate(params, shape, ids, mask, jax.random.PRNGKey(1), **kwargs)]


def test_fast_and_plain_drivers_agree(tiny):
    before = TRACE_COUNTS["fast"]
    for temperature, top_p in ((1.5, 0.9), (0.0, 1.0)):  # sampled, then greedy through temperature 0
        fast = run(tiny, temperature=temperature, top_p=top_p, fast_generate=True)
        plain = run(tiny, temperature=temperature, top_p=top_p, fast_generate=False)
        for a, b in zip(fast, plain, strict=True):
            np.testing.assert_array_equal(a, b)
        tokens, mask, lengths = fast
        assert tokens.shape == mask.shape == (4, 10) and (tokens < 100).all()  # never a padded-vocab row
        np.testing.assert_array_equal(mask.sum(1), lengths)
        assert (tokens[mask == 0] == PAD).all()
    assert TRACE_COUNTS["fast"] == before + 1  # temperature/top_p are traced: one program
    greedy = run(tiny, greedy=True)
    np.testing.assert_array_equal(greedy[0], fast[0])


def test_rows_stop_at_eos(tiny):
    """Pick EOS = the token row 0 emits first under greedy decoding: that row stops there, the
    others run on until their own first EOS; both drivers agree (same compiled programs as above:
    EOS id and temperature are traced)."""
    probe = run(tiny, temperature=0.0)[0]
    eos = int(probe[0, 0])
    fast = run(tiny, temperature=0.0, eos_id=eos, return_steps=True)
    plain = run(tiny, temperature=0.0, eos_id=eos, fast_generate=False, return_steps=True)
    for a, b in zip(fast, plain, strict=True):
        np.testing.assert_array_equal(a, b)
    tokens, mask, lengths, steps = fast
    assert steps == lengths.max()
    assert lengths[0] == 1 and tokens[0, 0] == eos and (tokens[0, 1:] == PAD).all()
    for row in range(4):
        first_eos = np.flatnonzero(probe[row] == eos)
        n = first_eos[0] + 1 if first_eos.size else probe.shape[1]
        assert lengths[row] == n
        np.testing.assert_array_equal(tokens[row, :n], probe[row, :n])
    # Every row a copy of row 0: all are done after the first token, and both loops stop right there.
    qwen2, shape, params, ids, mask = tiny
    same = (qwen2, shape, params, np.repeat(ids[:1], 4, axis=0), np.repeat(mask[:1], 4, axis=0))
    for fast_generate in (True, False):
        tokens, _, lengths, steps = run(same, temperature=0.0, eos_id=eos, fast_generate=fast_generate,
                                        return_steps=True)
        assert steps == 1 and (lengths == 1).all() and (tokens[:, 1:] == PAD).all()


def test_fast_attention_is_argmax_within_bf16_tolerance(tiny):
    """Greedy tokens from the bf16 fast decode attention are the f32 model's argmax up to bf16
    error at every step (teacher-forced check of the generated sequence)."""
    qwen2, shape, params, ids, mask = tiny
    tokens, comp_mask, _ = run(tiny, greedy=True, fast_attention=True, compute_dtype=jnp.bfloat16)
    full_ids = np.concatenate([ids, tokens], axis=1)
    full_mask = np.concatenate([mask, comp_mask], axis=1)
    positions = qwen2.positions_from_mask(jnp.asarray(full_mask))
    logits, _ = qwen2.forward(params, shape, jnp.asarray(full_ids), positions, jnp.asarray(full_mask),
                              compute_dtype=jnp.float32)
    logits = np.asarray(logits)[:, ids.shape[1] - 1: -1, : shape.vocab_size]  # predicts each generated token
    chosen = np.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
    gap = (logits.max(-1) - chosen)[comp_mask == 1]
    assert gap.max() < 0.05 * max(1.0, float(np.abs(logits).max()))


def test_rollout_fast_paths_default_on_and_env_opt_out(monkeypatch):
    from rec.decode.sampling import rollout_fast_paths

    monkeypatch.delenv("ROLLOUT_FAST_GENERATE", raising=False)
    monkeypatch.delenv("ROLLOUT_FAST_QWEN2_DECODE_ATTENTION", raising=False)
    assert rollout_fast_paths() == (True, True)
    assert rollout_fast_paths("off", "on") == (False, True)
    monkeypatch.setenv("ROLLOUT_FAST_GENERATE", "0")
    assert rollout_fast_paths() == (False, True)
    monkeypatch.setenv("ROLLOUT_FAST_QWEN2_DECODE_ATTENTION", "0")
    monkeypatch.setenv("ROLLOUT_FAST_GENERATE", "1")
    assert rollout_fast_paths("off", "on") == (True, False)
