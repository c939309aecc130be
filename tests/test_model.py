"""The Qwen2 decoder's math (rec.model.qwen2) and vocabulary growth (rec.model.resize), no torch needed."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rec.errors import RecError
from rec.model.qwen2 import (
    PARTITION_RULES,
    SHAPES,
    ModelShape,
    apply_rope,
    fast_decode_attention,
    flops_per_token,
    forward,
    init_cache,
    init_params,
    logits_from_hidden,
    param_count,
    partition_specs,
    plain_attention,
    positions_from_mask,
    rms_norm,
    rope_cos_sin,
    shape_with_vocab,
)
from rec.model.resize import grow_vocab

VOCAB = 97

# One compiled program per call signature (op-by-op dispatch is much slower on a busy CPU).
forward = jax.jit(
    forward, static_argnames=("shape", "compute_dtype", "decode_attention", "remat", "return_hidden", "dropout")
)


def _tiny(tied=True, vocab=VOCAB, **kw):
    import dataclasses

    return dataclasses.replace(shape_with_vocab(SHAPES["tiny"], vocab), tie_embeddings=tied, **kw)


def _params(shape, seed=0, vocab_multiple=1, scale=5.0):
    """Random params with non-trivial biases/norms and larger weights so outputs are not near zero."""
    params = init_params(shape, jax.random.PRNGKey(seed), jnp.float32, vocab_multiple)
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 100), 64))

    def perturb(path, x):
        name = "/".join(str(p.key) for p in path)
        if name.endswith("bias"):
            return 0.1 * jax.random.normal(next(keys), x.shape)
        if name.endswith("scale"):
            return jax.random.uniform(next(keys), x.shape, minval=0.5, maxval=1.5)
        return x * scale

    params = jax.tree_util.tree_map_with_path(perturb, params)
    # keep the padding rows zero (perturb scaled them, zero stays zero)
    return params


def _left_padded(vocab, lengths, total, seed=0):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=(len(lengths), total))
    mask = np.zeros((len(lengths), total), bool)
    for i, n in enumerate(lengths):
        mask[i, total - n :] = True
    tokens[~mask] = 0
    return jnp.asarray(tokens), jnp.asarray(mask)


# ---------------------------------------------------------------------------------------------
# building blocks against independent numpy implementations


def test_rms_norm_hand_computed():
    x = jnp.array([[3.0, 4.0]])
    scale = jnp.array([2.0, 0.5])
    # mean square = 12.5 -> x / sqrt(12.5 + eps) * scale
    expected = np.array([[3.0 / math.sqrt(12.5 + 1e-6) * 2.0, 4.0 / math.sqrt(12.5 + 1e-6) * 0.5]])
    np.testing.assert_allclose(np.asarray(rms_norm(x, scale, 1e-6)), expected, rtol=1e-6)


def test_rope_matches_complex_rotation():
    """HF rotate_half RoPE = rotating the pairs (x_i, x_{i+D/2}) by angle pos * theta^(-2i/D)."""
    rng = np.random.default_rng(0)
    B, T, N, D, theta = 2, 5, 3, 8, 10000.0
    x = rng.normal(size=(B, T, N, D)).astype(np.float32)
    positions = rng.integers(0, 50, size=(B, T))
    cos, sin = rope_cos_sin(jnp.asarray(positions), D, theta)
    ours = np.asarray(apply_rope(jnp.asarray(x), cos, sin))
    half = D // 2
    z = x[..., :half] + 1j * x[..., half:]
    angle = positions[:, :, None, None] * theta ** (-np.arange(half) * 2.0 / D)
    rotated = z * np.exp(1j * angle)
    expected = np.concatenate([rotated.real, rotated.imag], axis=-1)
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def _brute_attention(q, k, v, allowed):
    """Loop over every (b, t, head) with explicit GQA head mapping."""
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    out = np.zeros_like(q)
    for b in range(B):
        for t in range(T):
            for h in range(Hq):
                kv = h // (Hq // Hkv)
                keys = [s for s in range(k.shape[1]) if allowed[b, t, s]]
                if not keys:
                    continue
                scores = np.array([q[b, t, h] @ k[b, s, kv] / math.sqrt(D) for s in keys])
                w = np.exp(scores - scores.max())
                w /= w.sum()
                out[b, t, h] = sum(wi * v[b, s, kv] for wi, s in zip(w, keys, strict=True))
    return out


def test_attention_matches_brute_force_gqa():
    rng = np.random.default_rng(1)
    B, T, S, Hq, Hkv, D = 2, 3, 6, 4, 2, 8
    q = rng.normal(size=(B, T, Hq, D)).astype(np.float32)
    k = rng.normal(size=(B, S, Hkv, D)).astype(np.float32)
    v = rng.normal(size=(B, S, Hkv, D)).astype(np.float32)
    allowed = rng.random((B, T, S)) > 0.4
    allowed[:, :, 0] = True
    expected = _brute_attention(q, k, v, allowed)
    ours = np.asarray(plain_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed)))
    np.testing.assert_allclose(ours, expected, atol=1e-5)
    q1 = q[:, :1]
    fast = fast_decode_attention(jnp.asarray(q1), jnp.asarray(k), jnp.asarray(v), jnp.asarray(allowed[:, :1]))
    np.testing.assert_allclose(np.asarray(fast), expected[:, :1], atol=3e-2)


def test_fully_masked_rows_are_finite():
    q = jnp.ones((1, 2, 2, 4))
    kv = jnp.ones((1, 2, 1, 4))
    allowed = jnp.zeros((1, 2, 2), bool)
    assert np.isfinite(np.asarray(plain_attention(q, kv, kv, allowed))).all()


# ---------------------------------------------------------------------------------------------
# forward


@pytest.mark.parametrize("tied", [True, False])
def test_padded_vocab_same_log_softmax(tied):
    shape = _tiny(tied)
    params = _params(shape, vocab_multiple=1)
    padded = dict(params)
    padded["embed_tokens"] = {"embedding": jnp.pad(params["embed_tokens"]["embedding"], ((0, 31), (0, 0)))}
    if not tied:
        padded["lm_head"] = {"kernel": jnp.pad(params["lm_head"]["kernel"], ((0, 0), (0, 31)))}
    tokens, mask = _left_padded(VOCAB, [6, 3], 6)
    pos = positions_from_mask(mask)
    a, _ = forward(params, shape, tokens, pos, mask, compute_dtype=jnp.float32)
    b, _ = forward(padded, shape, tokens, pos, mask, compute_dtype=jnp.float32)
    assert a.shape[-1] == VOCAB and b.shape[-1] == VOCAB + 31
    assert np.isneginf(np.asarray(b[..., VOCAB:])).all()
    lp_a = np.asarray(jax.nn.log_softmax(a, axis=-1))
    lp_b = np.asarray(jax.nn.log_softmax(b, axis=-1))
    np.testing.assert_allclose(lp_b[..., :VOCAB], lp_a, atol=1e-5)
    assert np.isfinite(lp_a).all()


def test_init_params_padding_and_shapes():
    shape = _tiny(False)
    params = init_params(shape, jax.random.PRNGKey(0), jnp.bfloat16, vocab_multiple=32)
    assert params["embed_tokens"]["embedding"].shape == (128, 64)
    assert params["lm_head"]["kernel"].shape == (64, 128)
    assert params["layers"]["self_attn"]["k_proj"]["kernel"].shape == (2, 64, 32)
    assert params["embed_tokens"]["embedding"].dtype == jnp.bfloat16
    assert not np.asarray(params["embed_tokens"]["embedding"][VOCAB:], np.float32).any()
    assert "lm_head" not in init_params(_tiny(True), jax.random.PRNGKey(0))


def test_return_hidden_and_logits_from_hidden_agree():
    shape = _tiny(False)
    params = _params(shape, vocab_multiple=16)
    tokens, mask = _left_padded(VOCAB, [5, 2], 5)
    pos = positions_from_mask(mask)
    logits, _ = forward(params, shape, tokens, pos, mask, compute_dtype=jnp.float32)
    hidden, _ = forward(params, shape, tokens, pos, mask, compute_dtype=jnp.float32, return_hidden=True)
    assert hidden.shape == (2, 5, 64)
    np.testing.assert_allclose(
        np.asarray(logits_from_hidden(params, shape, hidden)), np.asarray(logits), atol=1e-6
    )


def test_bf16_compute_close_to_f32_and_logits_f32():
    shape = _tiny(True)
    params = _params(shape, scale=1.0)
    tokens, mask = _left_padded(VOCAB, [7, 4], 7)
    pos = positions_from_mask(mask)
    f32, _ = forward(params, shape, tokens, pos, mask, compute_dtype=jnp.float32)
    bf16, _ = forward(params, shape, tokens, pos, mask, compute_dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32
    m = np.asarray(mask)
    assert np.abs(np.asarray(bf16)[m] - np.asarray(f32)[m]).max() < 0.05 * np.abs(np.asarray(f32)[m]).max()


def test_remat_same_value_and_grads():
    shape = _tiny(True)
    params = _params(shape, scale=1.0)
    tokens, mask = _left_padded(VOCAB, [6, 6], 6)
    pos = positions_from_mask(mask)

    def loss(p, remat):
        logits, _ = forward(p, shape, tokens, pos, mask, compute_dtype=jnp.float32, remat=remat)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1))

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    v1, g1 = grad(params, False)
    v2, g2 = grad(params, True)
    np.testing.assert_allclose(float(v1), float(v2), rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_padding_tokens_do_not_change_valid_logits():
    """The same sequence with more left padding gives the same logits at its valid positions."""
    shape = _tiny(True)
    params = _params(shape)
    seq = jnp.array([5, 17, 3, 44])
    short = seq[None]
    long_tokens = jnp.concatenate([jnp.array([[9, 9, 9]]), short], axis=1)
    long_mask = jnp.array([[False] * 3 + [True] * 4])
    a, _ = forward(
        params,
        shape,
        short,
        positions_from_mask(jnp.ones((1, 4), bool)),
        jnp.ones((1, 4), bool),
        compute_dtype=jnp.float32,
    )
    b, _ = forward(
        params, shape, long_tokens, positions_from_mask(long_mask), long_mask, compute_dtype=jnp.float32
    )
    np.testing.assert_allclose(np.asarray(b[:, 3:]), np.asarray(a), atol=1e-4)


@pytest.mark.parametrize(
    "attention,cache_dtype,tol", [("plain", jnp.float32, 1e-5), ("fast", jnp.bfloat16, 0.05)]
)
def test_kv_cache_prefill_then_decode_matches_full_forward(attention, cache_dtype, tol):
    """Prefill a left-padded prompt, then decode token by token: same logits as one full forward."""
    shape = _tiny(False)
    params = _params(shape, vocab_multiple=8)  # logits spread ~0.8, so the tolerances below mean something
    prompt_len, new = 5, 4
    tokens, mask = _left_padded(VOCAB, [5, 2, 4], prompt_len + new, seed=3)
    # the generated tail is valid for every row
    full_mask = mask.at[:, prompt_len:].set(True)
    full_pos = positions_from_mask(full_mask)
    reference, _ = forward(params, shape, tokens, full_pos, full_mask, compute_dtype=jnp.float32)

    S = prompt_len + new + 3  # cache longer than needed: unused slots must stay masked
    cache = init_cache(shape, 3, S, cache_dtype)
    cache_mask = jnp.zeros((3, S), bool).at[:, :prompt_len].set(full_mask[:, :prompt_len])
    step = forward
    logits, cache = step(
        params,
        shape,
        tokens[:, :prompt_len],
        full_pos[:, :prompt_len],
        cache_mask,
        cache=cache,
        cache_index=0,
        compute_dtype=jnp.float32,
        decode_attention=attention,
    )
    got = [logits]
    for t in range(prompt_len, prompt_len + new):
        cache_mask = cache_mask.at[:, t].set(True)
        logits, cache = step(
            params,
            shape,
            tokens[:, t : t + 1],
            full_pos[:, t : t + 1],
            cache_mask,
            cache=cache,
            cache_index=jnp.int32(t),
            compute_dtype=jnp.float32,
            decode_attention=attention,
        )
        got.append(logits)
    got = np.asarray(jnp.concatenate(got, axis=1))[..., :VOCAB]
    ref = np.asarray(reference)[..., :VOCAB]
    m = np.asarray(full_mask)
    assert ref[m].std() > 0.5
    assert np.abs(got[m] - ref[m]).max() <= tol
    assert cache["k"].shape == (2, 3, S, 2, 16) and cache["k"].dtype == cache_dtype
    # slots never written stay zero
    assert not np.asarray(cache["k"][:, :, prompt_len + new :], np.float32).any()


def test_fast_decode_close_to_plain_on_the_same_bf16_cache():
    shape = _tiny(True)
    params = _params(shape)
    tokens, mask = _left_padded(VOCAB, [4, 2], 4)
    cache = init_cache(shape, 2, 6, jnp.bfloat16)
    cmask = jnp.zeros((2, 6), bool).at[:, :4].set(mask)
    _, cache = forward(params, shape, tokens, positions_from_mask(mask), cmask, cache=cache, cache_index=0)
    cmask = cmask.at[:, 4].set(True)
    nxt = jnp.array([[7], [8]])
    pos = positions_from_mask(cmask)[:, 4:5]
    outs = [
        forward(params, shape, nxt, pos, cmask, cache=cache, cache_index=4, decode_attention=a)[0]
        for a in ("plain", "fast")
    ]
    np.testing.assert_allclose(np.asarray(outs[0]), np.asarray(outs[1]), atol=0.05)


# ---------------------------------------------------------------------------------------------
# shapes, counts, sharding


def test_shape_hf_config_round_trip_and_errors():
    shape = SHAPES["qwen2.5-7b"]
    assert ModelShape.from_hf_config(shape.to_hf_config()) == shape
    cfg = shape.to_hf_config()
    del cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 5.0}
    assert ModelShape.from_hf_config(cfg).rope_theta == 5.0
    with pytest.raises(RecError, match="rope type 'yarn'"):
        ModelShape.from_hf_config(
            {**shape.to_hf_config(), "rope_scaling": {"rope_type": "yarn", "factor": 4}}
        )
    with pytest.raises(RecError, match="x.json: missing key 'hidden_size'"):
        ModelShape.from_hf_config({"vocab_size": 3}, source="x.json")
    assert shape.padded_vocab(128) == 152064 and SHAPES["qwen2.5-0.5b"].padded_vocab(100) == 152000


def test_published_qwen25_config_json_gives_named_shape():
    """The config.json Qwen/Qwen2.5-0.5B ships (transformers 4.40 layout) parses to SHAPES entry."""
    published = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "hidden_size": 896,
        "initializer_range": 0.02,
        "intermediate_size": 4864,
        "max_position_embeddings": 32768,
        "max_window_layers": 24,
        "model_type": "qwen2",
        "num_attention_heads": 14,
        "num_hidden_layers": 24,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": 151936,
    }
    assert ModelShape.from_hf_config(published) == SHAPES["qwen2.5-0.5b"]
    with pytest.raises(RecError, match="use_sliding_window"):
        ModelShape.from_hf_config({**published, "use_sliding_window": True})
    with pytest.raises(RecError, match="model_type 'llama'"):
        ModelShape.from_hf_config({**published, "model_type": "llama"})


@pytest.mark.parametrize(
    "name,billions",
    [("qwen2.5-0.5b", 0.49), ("qwen2.5-1.5b", 1.54), ("qwen2.5-3b", 3.09), ("qwen2.5-7b", 7.62)],
)
def test_named_shapes_match_published_parameter_counts(name, billions):
    """Parameter counts from the Qwen2.5 model cards (0.49B, 1.54B, 3.09B, 7.61B), without allocating."""
    shape = SHAPES[name]
    abstract = jax.eval_shape(lambda k: init_params(shape, k, jnp.bfloat16), jax.random.PRNGKey(0))
    assert abs(param_count(abstract) / 1e9 - billions) < 0.011


def test_flops_per_token_hand_computed():
    shape = _tiny(True, vocab=100)
    # per layer: q 64*64 + k,v 2*64*32 + o 64*64 + mlp 3*64*128 = 4096+4096+4096+24576 = 36864
    matmul = 2 * 36864 + 64 * 100
    attention = 4 * 2 * 10 * 64
    assert flops_per_token(shape, 10, training=False) == 2 * matmul + attention
    assert flops_per_token(shape, 10) == 3 * (2 * matmul + attention)


def test_partition_specs_cover_every_leaf():
    for tied in (True, False):
        params = jax.eval_shape(lambda k, t=tied: init_params(_tiny(t), k), jax.random.PRNGKey(0))
        specs = partition_specs(params)
        flat = jax.tree_util.tree_leaves_with_path(params)
        spec_flat = dict(
            jax.tree_util.tree_leaves_with_path(
                specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)
            )
        )
        for path, leaf in flat:
            spec = spec_flat[path]
            assert len(spec) == leaf.ndim, (path, spec)
        assert specs["layers"]["self_attn"]["q_proj"]["kernel"] == jax.sharding.PartitionSpec(
            None, "fsdp", "tensor"
        )
        assert specs["layers"]["mlp"]["down_proj"]["kernel"] == jax.sharding.PartitionSpec(
            None, "tensor", "fsdp"
        )
    assert all(isinstance(p, str) for p, _ in PARTITION_RULES)


@pytest.mark.slow
def test_sharded_forward_on_fake_mesh_matches_single_device(tmp_path):
    """Params placed with PARTITION_RULES on a (1,2,2) CPU mesh: jitted forward equals unsharded."""
    script = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import Mesh, NamedSharding
        from rec.model.qwen2 import SHAPES, shape_with_vocab, init_params, forward, partition_specs, positions_from_mask
        import dataclasses
        shape = dataclasses.replace(shape_with_vocab(SHAPES["tiny"], 100), tie_embeddings=False)
        params = init_params(shape, jax.random.PRNGKey(0), jnp.float32, vocab_multiple=128)
        mesh = Mesh(np.array(jax.devices()).reshape(1, 2, 2), ("data", "fsdp", "tensor"))
        specs = partition_specs(params)
        placed = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
        tokens = jnp.arange(16).reshape(2, 8) % 100
        mask = jnp.ones((2, 8), bool)
        f = jax.jit(lambda p: forward(p, shape, tokens, positions_from_mask(mask), mask, compute_dtype=jnp.float32)[0])
        a, b = np.asarray(f(placed)), np.asarray(f(params))
        assert np.allclose(a[..., :100], b[..., :100], atol=1e-5), np.abs(a - b).max()
        print("OK", len(placed["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set))
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK 4" in result.stdout


# ---------------------------------------------------------------------------------------------
# grow_vocab


@pytest.mark.parametrize("tied,host", [(True, False), (False, False), (False, True)])
def test_grow_vocab_mean_rows_keeps_padding(tied, host):
    shape = _tiny(tied, vocab=10)
    params = _params(shape, vocab_multiple=16)
    if host:  # as load_hf returns them
        params = jax.tree.map(np.asarray, params)
    old_embed = np.asarray(params["embed_tokens"]["embedding"])
    new_shape, grown = grow_vocab(params, shape, 13, vocab_multiple=16)
    assert new_shape.vocab_size == 13 and new_shape.tie_embeddings == tied
    assert isinstance(grown["embed_tokens"]["embedding"], np.ndarray) == host
    embed = np.asarray(grown["embed_tokens"]["embedding"])
    assert embed.shape == (16, 64)  # 13 still fits in the 16 padded rows
    np.testing.assert_array_equal(embed[:10], old_embed[:10])
    for row in range(10, 13):
        np.testing.assert_allclose(embed[row], old_embed[:10].sum(0) / 10, atol=1e-6)
    assert not embed[13:].any()
    if not tied:
        old_head = np.asarray(params["lm_head"]["kernel"])
        head = np.asarray(grown["lm_head"]["kernel"])
        assert head.shape == (64, 16)
        np.testing.assert_allclose(head[:, 12], old_head[:, :10].mean(1), atol=1e-6)
        np.testing.assert_array_equal(head[:, :10], old_head[:, :10])
    # grown rows are real tokens now: finite logits; padding still -inf
    logits, _ = forward(
        grown,
        new_shape,
        jnp.array([[1, 12]]),
        jnp.array([[0, 1]]),
        jnp.ones((1, 2), bool),
        compute_dtype=jnp.float32,
    )
    assert np.isfinite(np.asarray(logits[..., :13])).all() and np.isneginf(np.asarray(logits[..., 13:])).all()


def test_grow_vocab_grows_padding_and_never_shrinks():
    shape = _tiny(True, vocab=10)
    params = _params(shape, vocab_multiple=16)
    new_shape, grown = grow_vocab(params, shape, 20, vocab_multiple=16)
    assert grown["embed_tokens"]["embedding"].shape == (32, 64) and new_shape.vocab_size == 20
    same_shape, same = grow_vocab(params, shape, 7)
    assert same_shape == shape and same is params
    with pytest.raises(RecError):
        grow_vocab(params, shape, 0)


def test_program_size_does_not_grow_with_depth():
    """Layers run under one scan: the lowered program for 8 layers is the size of the 2-layer one."""

    def hlo_size(layers):
        shape = _tiny(True, num_layers=layers)
        params = jax.eval_shape(lambda k: init_params(shape, k), jax.random.PRNGKey(0))
        tokens = jax.ShapeDtypeStruct((2, 8), jnp.int32)
        mask = jax.ShapeDtypeStruct((2, 8), jnp.bool_)
        lowered = jax.jit(forward, static_argnames=("shape",)).lower(params, shape, tokens, tokens, mask)
        return len(lowered.as_text())

    small, deep = hlo_size(2), hlo_size(8)
    assert abs(deep - small) < 0.02 * small


def test_out_of_range_padding_ids_do_not_poison_valid_rows():
    shape = _tiny(True)
    params = _params(shape)
    tokens, mask = _left_padded(VOCAB, [4, 2], 4)
    pos = positions_from_mask(mask)
    clean, _ = forward(params, shape, tokens, pos, mask, compute_dtype=jnp.float32)
    m = np.asarray(mask)
    for bad_id in (-1, 10**6):
        weird = jnp.where(mask, tokens, bad_id)
        got, _ = forward(params, shape, weird, pos, mask, compute_dtype=jnp.float32)
        np.testing.assert_allclose(np.asarray(got)[m], np.asarray(clean)[m], atol=1e-6)


@pytest.mark.parametrize("attention", ["plain", "fast"])
def test_decode_step_updates_cache_in_place(attention):
    """The compiled decode step never copies the whole [L,B,S,Hkv,D] cache (it would double the
    memory traffic of every generated token); only the new slots are written."""
    shape = _tiny(True)
    params = jax.eval_shape(lambda k: init_params(shape, k), jax.random.PRNGKey(0))
    batch, slots = 3, 40
    cache = jax.eval_shape(lambda: init_cache(shape, batch, slots, jnp.bfloat16))
    tok = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    mask = jax.ShapeDtypeStruct((batch, slots), jnp.bool_)

    def step(p, c, t, m, i):
        return forward(p, shape, t, t, m, cache=c, cache_index=i, decode_attention=attention)

    compiled = jax.jit(step, donate_argnums=1).lower(params, cache, tok, mask, jnp.int32(0)).compile()
    full = "[2,3,40,2,16]"
    copies = [line for line in compiled.as_text().splitlines() if full in line and " copy(" in line]
    assert not copies, copies[:3]


def _row_keys(rows, seed=3):
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(seed), i))(jnp.asarray(rows))


def test_residual_dropout_rate_and_scale():
    from rec.model.qwen2 import residual_dropout

    x = jnp.ones((4, 50, 64), jnp.float32)
    y = np.asarray(residual_dropout(x, 0.25, _row_keys(np.arange(4))))
    np.testing.assert_allclose(np.unique(y), [0.0, 1 / 0.75], rtol=1e-6)
    assert abs((y == 0).mean() - 0.25) < 0.02  # 12,800 draws: 4 standard deviations
    assert abs(y.mean() - 1.0) < 0.03  # inverted dropout keeps the expectation


def test_dropout_off_is_the_plain_forward_and_on_changes_it():
    shape = _tiny()
    params = _params(shape)
    tokens, mask = _left_padded(VOCAB, [5, 8, 3], 8)
    pos = positions_from_mask(mask)
    plain, _ = forward(params, shape, tokens, pos, mask, compute_dtype=jnp.float32)
    keys = _row_keys(np.arange(3))
    for kw in ({"dropout": 0.0, "dropout_keys": keys}, {"dropout": 0.3, "dropout_keys": None}):
        out, _ = forward(params, shape, tokens, pos, mask, compute_dtype=jnp.float32, **kw)
        np.testing.assert_array_equal(np.asarray(out), np.asarray(plain))
    dropped, _ = forward(params, shape, tokens, pos, mask, compute_dtype=jnp.float32, dropout=0.3, dropout_keys=keys)
    assert np.abs(np.asarray(dropped) - np.asarray(plain)).max() > 1e-2


def test_dropout_masks_follow_the_row_keys_not_the_batch():
    """A row's dropout depends on its own key only: the same rows in another batch order (or split
    over micro-batches / processes) get the same outputs."""
    shape = _tiny()
    params = _params(shape)
    tokens, mask = _left_padded(VOCAB, [5, 8, 3, 6], 8)
    pos = positions_from_mask(mask)
    keys = _row_keys(np.arange(4))
    full, _ = forward(params, shape, tokens, pos, mask, compute_dtype=jnp.float32, dropout=0.2, dropout_keys=keys)
    pick = np.array([2, 0])
    part, _ = forward(params, shape, tokens[pick], pos[pick], mask[pick], compute_dtype=jnp.float32, dropout=0.2,
                      dropout_keys=keys[pick])
    np.testing.assert_allclose(np.asarray(part), np.asarray(full)[pick], rtol=1e-5, atol=1e-5)
    other, _ = forward(params, shape, tokens, pos, mask, compute_dtype=jnp.float32, dropout=0.2,
                       dropout_keys=_row_keys(np.arange(4), seed=4))
    assert np.abs(np.asarray(other) - np.asarray(full)).max() > 1e-2
