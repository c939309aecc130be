"""Qwen2-family decoder as pure JAX functions over a plain nested parameter dict.

Every stage (SFT, RL rollouts, beam search, GSM8K GRPO, eval) runs this one `forward`. It matches
Hugging Face `Qwen2ForCausalLM` (eager attention) on the same weights: grouped-query attention with
q/k/v biases and no o_proj bias, default RoPE from `rope_theta` at per-token positions, RMSNorm
computed in float32, SwiGLU MLP, tied or untied LM head.

Parameter tree (names follow the HF tensor names so the mapping in `hf_io` is mechanical; the
decoder layers are stacked on a leading `L` axis and run with `lax.scan`, so compile time does not
grow with depth; kernels are `[in, out]`, i.e. HF weights transposed)::

    embed_tokens/embedding                  [Vpad, H]
    layers/input_layernorm/scale            [L, H]
    layers/self_attn/q_proj/kernel          [L, H, Hq*D]     q_proj/bias [L, Hq*D]
    layers/self_attn/k_proj/kernel          [L, H, Hkv*D]    k_proj/bias [L, Hkv*D]
    layers/self_attn/v_proj/kernel          [L, H, Hkv*D]    v_proj/bias [L, Hkv*D]
    layers/self_attn/o_proj/kernel          [L, Hq*D, H]
    layers/post_attention_layernorm/scale   [L, H]
    layers/mlp/gate_proj/kernel             [L, H, I]
    layers/mlp/up_proj/kernel               [L, H, I]
    layers/mlp/down_proj/kernel             [L, I, H]
    norm/scale                              [H]
    lm_head/kernel                          [H, Vpad]        (absent when embeddings are tied)

`Vpad` >= `shape.vocab_size`: rows beyond the true vocabulary exist only for sharding/tiling and
their logits are forced to -inf, so a log-softmax over our logits equals HF's over the true rows.

KV cache: `{"k": [L,B,S,Hkv,D], "v": [L,B,S,Hkv,D]}` with one write index shared by the batch
(prompts are left padded, so all rows advance together) and a per-row key mask `[B,S]`.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from rec.errors import RecError

Params = dict[str, Any]


# --------------------------------------------------------------------------------------------
# Shapes


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """Architecture numbers of a Qwen2 model (mirrors HF `Qwen2Config`). Hashable: usable as a jit static."""

    vocab_size: int  # true rows, as in HF config.json (the embedding may be padded beyond this)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = True
    max_position_embeddings: int = 32768

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise RecError(
                f"model shape: num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "head_dim"):
            if getattr(self, name) <= 0:
                raise RecError(f"model shape: {name} must be positive, got {getattr(self, name)}")

    def padded_vocab(self, multiple: int = 1) -> int:
        """Embedding rows when padding the vocabulary up to a multiple of `multiple`."""
        multiple = max(int(multiple), 1)
        return -(-self.vocab_size // multiple) * multiple

    @classmethod
    def from_hf_config(cls, config: dict, source: str = "config.json") -> ModelShape:
        """Shape from a HF Qwen2/Qwen2.5 config dict (transformers 4 or 5 layout)."""
        model_type = config.get("model_type", "qwen2")
        if model_type not in ("qwen2",):
            raise RecError(f"{source}: model_type {model_type!r} is not supported (expected 'qwen2')")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            raise RecError(f"{source}: hidden_act {act!r} is not supported (Qwen2 uses 'silu')")
        # transformers 5 moved rope_theta (and scaling) into `rope_parameters`.
        rope = config.get("rope_parameters") or {}
        scaling = config.get("rope_scaling") or {}
        for section in (rope, scaling):
            rope_type = section.get("rope_type") or section.get("type")
            if rope_type not in (None, "default"):
                raise RecError(f"{source}: rope type {rope_type!r} is not supported (only the default RoPE)")
        if config.get("use_sliding_window"):
            raise RecError(f"{source}: use_sliding_window=true is not supported (full attention only)")
        theta = config.get("rope_theta", rope.get("rope_theta", 10000.0))
        required = [
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
        ]
        for key in required:
            if key not in config:
                raise RecError(f"{source}: missing key {key!r}")
        heads = int(config["num_attention_heads"])
        hidden = int(config["hidden_size"])
        return cls(
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=int(config["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            rope_theta=float(theta),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            tie_embeddings=bool(config.get("tie_word_embeddings", False)),
            max_position_embeddings=int(config.get("max_position_embeddings", 32768)),
        )

    def to_hf_config(self, dtype: str = "bfloat16") -> dict:
        """A config.json dict that transformers 4.x and 5.x both read as this Qwen2 model."""
        return {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "rope_scaling": None,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_dropout": 0.0,
            "initializer_range": 0.02,
            "use_cache": True,
            "use_sliding_window": False,
            "torch_dtype": dtype,
            "dtype": dtype,
        }


def shape_with_vocab(shape: ModelShape, vocab_size: int) -> ModelShape:
    """`shape` with another true vocabulary size (the tiny shape is vocabulary-agnostic)."""
    return dataclasses.replace(shape, vocab_size=int(vocab_size))


def _qwen2_shape(hidden, inter, layers, heads, kv, vocab=151936, tied=True) -> ModelShape:
    return ModelShape(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=hidden // heads,
        rope_theta=1_000_000.0,
        rms_norm_eps=1e-6,
        tie_embeddings=tied,
        max_position_embeddings=32768,
    )


# Published Qwen2.5 config.json numbers. `tiny` has a placeholder vocabulary: callers size it to
# their tokenizer with `shape_with_vocab`.
SHAPES: dict[str, ModelShape] = {
    "tiny": _qwen2_shape(64, 128, 2, 4, 2, vocab=256),
    # tiny's width, twice its depth and a wider MLP; tried for the CPU recipe (docs/RECIPE.md)
    "mini": _qwen2_shape(64, 256, 4, 4, 2, vocab=256),
    # tiny's depth at twice its width and a 4x MLP (head dim 32); tried for the CPU recipe
    "wide": _qwen2_shape(128, 512, 2, 4, 2, vocab=256),
    "qwen2.5-0.5b": _qwen2_shape(896, 4864, 24, 14, 2),
    "qwen2.5-1.5b": _qwen2_shape(1536, 8960, 28, 12, 2),
    "qwen2.5-3b": _qwen2_shape(2048, 11008, 36, 16, 2),
    "qwen2.5-7b": _qwen2_shape(3584, 18944, 28, 28, 4, vocab=152064, tied=False),
}


def get_shape(name: str, key: str = "model.shape") -> ModelShape:
    """Named shape, or a RecError naming the config key and the choices."""
    if name not in SHAPES:
        raise RecError(f"{key}: unknown shape {name!r} (choose from {', '.join(SHAPES)})")
    return SHAPES[name]


# --------------------------------------------------------------------------------------------
# Parameters


def init_params(
    shape: ModelShape, key: jax.Array, param_dtype: Any = jnp.float32, vocab_multiple: int = 1
) -> Params:
    """Random parameters like HF's init (normal std 0.02, zero biases, unit norms, zero pad rows)."""
    dtype = jnp.dtype(param_dtype)
    L, H, inter = shape.num_layers, shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    vpad = shape.padded_vocab(vocab_multiple)
    keys = iter(jax.random.split(key, 9))

    def normal(shp):
        return (0.02 * jax.random.normal(next(keys), shp, jnp.float32)).astype(dtype)

    embedding = normal((vpad, H))
    # Padding rows stay zero: they are never looked up and their logits are masked anyway.
    embedding = embedding.at[shape.vocab_size :].set(0)
    params: Params = {
        "embed_tokens": {"embedding": embedding},
        "layers": {
            "input_layernorm": {"scale": jnp.ones((L, H), dtype)},
            "self_attn": {
                "q_proj": {"kernel": normal((L, H, q_dim)), "bias": jnp.zeros((L, q_dim), dtype)},
                "k_proj": {"kernel": normal((L, H, kv_dim)), "bias": jnp.zeros((L, kv_dim), dtype)},
                "v_proj": {"kernel": normal((L, H, kv_dim)), "bias": jnp.zeros((L, kv_dim), dtype)},
                "o_proj": {"kernel": normal((L, q_dim, H))},
            },
            "post_attention_layernorm": {"scale": jnp.ones((L, H), dtype)},
            "mlp": {
                "gate_proj": {"kernel": normal((L, H, inter))},
                "up_proj": {"kernel": normal((L, H, inter))},
                "down_proj": {"kernel": normal((L, inter, H))},
            },
        },
        "norm": {"scale": jnp.ones((H,), dtype)},
    }
    if not shape.tie_embeddings:
        params["lm_head"] = {"kernel": normal((H, vpad)).at[:, shape.vocab_size :].set(0)}
    return params


def padded_vocab_of(params: Params) -> int:
    """Rows of the (possibly padded) embedding."""
    return int(params["embed_tokens"]["embedding"].shape[0])


def param_count(params: Params) -> int:
    """Number of scalars in the tree (padding rows included)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)))


def flops_per_token(shape: ModelShape, seq_len: int, training: bool = True) -> float:
    """Model FLOPs per token (PaLM appendix B accounting, used for MFU).

    Matmul weights count 2 FLOPs per multiply-add in the forward pass; attention scores and the
    probability-value product add 2 * 2 * seq_len * Hq * D per layer (no causal discount, as in
    PaLM). Training is 3x the forward pass (forward + two backward matmuls). Embedding lookups are
    free; the LM head is a matmul and counts.
    """
    H, inter, L = shape.hidden_size, shape.intermediate_size, shape.num_layers
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    per_layer = H * q_dim + 2 * H * kv_dim + q_dim * H + 3 * H * inter
    matmul_params = L * per_layer + H * shape.vocab_size
    forward = 2.0 * matmul_params + 4.0 * L * seq_len * q_dim
    return 3.0 * forward if training else forward


# Regex over the "/"-joined parameter path -> PartitionSpec over mesh axes ("data", "fsdp", "tensor").
# First match wins. Layer-stacked tensors keep their leading L axis unsharded. Vocabulary dimensions
# go on "tensor" (logits are vocab-parallel), hidden dimensions on "fsdp"; norms are replicated.
PARTITION_RULES: list[tuple[str, P]] = [
    (r"^embed_tokens/embedding$", P("tensor", "fsdp")),
    (r"^lm_head/kernel$", P("fsdp", "tensor")),
    (r"^layers/self_attn/(q_proj|k_proj|v_proj)/kernel$", P(None, "fsdp", "tensor")),
    (r"^layers/self_attn/(q_proj|k_proj|v_proj)/bias$", P(None, "tensor")),
    (r"^layers/self_attn/o_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"^layers/mlp/(gate_proj|up_proj)/kernel$", P(None, "fsdp", "tensor")),
    (r"^layers/mlp/down_proj/kernel$", P(None, "tensor", "fsdp")),
    (r"^layers/.*/scale$", P(None, None)),
    (r"^norm/scale$", P(None)),
]


def path_str(path) -> str:
    """'/'-joined names of a jax tree path (dict keys)."""
    parts = []
    for entry in path:
        parts.append(str(getattr(entry, "key", getattr(entry, "name", getattr(entry, "idx", entry)))))
    return "/".join(parts)


def partition_specs(params: Params, rules: list[tuple[str, P]] = PARTITION_RULES) -> Any:
    """A tree of PartitionSpecs matching `params` (first matching rule; replicated when none match)."""

    def spec(path, leaf):
        name = path_str(path)
        for pattern, pspec in rules:
            if re.search(pattern, name):
                if len(pspec) > np.ndim(leaf):
                    raise RecError(
                        f"partition rule {pattern!r}: spec {pspec} has more axes than {name} {leaf.shape}"
                    )
                return pspec
        return P()

    return jax.tree_util.tree_map_with_path(spec, params)


# --------------------------------------------------------------------------------------------
# Building blocks (pure functions)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """HF Qwen2RMSNorm: normalise in float32, cast back, then multiply by the weight."""
    x32 = x.astype(jnp.float32)
    normed = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return normed.astype(x.dtype) * scale.astype(x.dtype)


def rope_cos_sin(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """Default RoPE tables for integer positions [B,T] -> cos, sin [B,T,D] in float32."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,D/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate x [B,T,N,D] (HF rotate_half convention); computed in float32, returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)


def _dense(x: jax.Array, kernel: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    y = jnp.einsum("bti,io->bto", x, kernel.astype(x.dtype))
    if bias is not None:
        y = y + bias.astype(x.dtype)
    return y


_MASK_VALUE = float(np.finfo(np.float32).min)  # finite: fully masked (padding) rows give no NaN


def plain_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """Generic attention with float32 scores, softmax and PV product (like HF eager).

    q [B,T,Hq,D], k/v [B,S,Hkv,D], allowed [B,T,S] bool -> [B,T,Hq,D] in q's dtype.
    """
    B, T, Hq, D = q.shape
    Hkv = k.shape[2]
    qg = q.astype(jnp.float32).reshape(B, T, Hkv, Hq // Hkv, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k.astype(jnp.float32)) / math.sqrt(D)
    scores = jnp.where(allowed[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v.astype(jnp.float32))
    return out.reshape(B, T, Hq, D).astype(q.dtype)


def fast_decode_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array) -> jax.Array:
    """One query token against the cache, specialised for decode speed.

    bf16 operands with float32 accumulation for the scores, float32 mask + softmax, probabilities
    cast to bf16 for the PV product (float32 accumulation). q [B,1,Hq,D], k/v [B,S,Hkv,D],
    allowed [B,1,S] -> [B,1,Hq,D] in q's dtype.
    """
    B, T, Hq, D = q.shape
    if T != 1:
        raise ValueError(f"fast_decode_attention takes one query token, got {T}")
    Hkv = k.shape[2]
    qg = q.reshape(B, Hkv, Hq // Hkv, D).astype(jnp.bfloat16)
    kb = k.astype(jnp.bfloat16)
    # [B,Hkv,G,D] x [B,S,Hkv,D] -> [B,Hkv,G,S], batch dims (B, Hkv), contract D.
    scores = lax.dot_general(qg, kb, (((3,), (3,)), ((0, 1), (0, 2))), preferred_element_type=jnp.float32)
    scores = scores * (1.0 / math.sqrt(D))
    scores = jnp.where(allowed[:, 0][:, None, None, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(jnp.bfloat16)
    # [B,Hkv,G,S] x [B,S,Hkv,D] -> [B,Hkv,G,D]
    out = lax.dot_general(
        probs, v.astype(jnp.bfloat16), (((3,), (1,)), ((0, 1), (0, 2))), preferred_element_type=jnp.float32
    )
    return out.reshape(B, 1, Hq, D).astype(q.dtype)


# --------------------------------------------------------------------------------------------
# Forward


def residual_dropout(x: jax.Array, rate: float, row_keys: jax.Array) -> jax.Array:
    """Inverted dropout of x [B,T,H] with one key per row (row_keys [B,2])."""
    keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - rate, x.shape[1:]))(row_keys)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def init_cache(
    shape: ModelShape, batch: int, max_len: int, dtype: Any = jnp.bfloat16
) -> dict[str, jax.Array]:
    """Zeroed KV cache {"k","v": [L,B,S,Hkv,D]}."""
    dims = (shape.num_layers, batch, max_len, shape.num_kv_heads, shape.head_dim)
    return {"k": jnp.zeros(dims, dtype), "v": jnp.zeros(dims, dtype)}


def logits_from_hidden(params: Params, shape: ModelShape, hidden: jax.Array) -> jax.Array:
    """Project final-norm hidden states [..., H] to float32 logits [..., Vpad]; padded rows are -inf."""
    if shape.tie_embeddings:
        weight = params["embed_tokens"]["embedding"].astype(hidden.dtype)  # [V,H]
        logits = jnp.einsum("...h,vh->...v", hidden, weight, preferred_element_type=jnp.float32)
    else:
        weight = params["lm_head"]["kernel"].astype(hidden.dtype)  # [H,V]
        logits = jnp.einsum("...h,hv->...v", hidden, weight, preferred_element_type=jnp.float32)
    vpad = logits.shape[-1]
    if vpad > shape.vocab_size:
        is_pad = lax.broadcasted_iota(jnp.int32, (vpad,), 0) >= shape.vocab_size
        logits = jnp.where(is_pad, -jnp.inf, logits)
    return logits


def forward(
    params: Params,
    shape: ModelShape,
    tokens: jax.Array,
    positions: jax.Array,
    mask: jax.Array,
    *,
    cache: dict[str, jax.Array] | None = None,
    cache_index: jax.Array | int | None = None,
    compute_dtype: Any = jnp.bfloat16,
    decode_attention: str = "plain",
    remat: bool = False,
    return_hidden: bool = False,
    dropout: float = 0.0,
    dropout_keys: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array] | None]:
    """Run the decoder.

    tokens, positions [B,T] int. Without a cache, `mask` [B,T] marks valid tokens and attention is
    causal over token order restricted to valid keys. With a cache, the T new tokens' K/V are
    written at slots [cache_index, cache_index+T) and `mask` [B,S] marks valid cache slots (the new
    tokens included); token t attends to valid slots <= cache_index+t.

    `dropout` > 0 with `dropout_keys` (uint32 [B,2], one PRNG key per row) drops that fraction of
    the embedding output and of each attention and MLP output before it joins the residual stream
    (training only; Qwen2 itself ships without dropout). Each row's masks come from its own key,
    so they do not depend on how the batch is split over micro-batches or processes.

    Returns (float32 logits [B,T,Vpad], or final-norm hidden [B,T,H] in compute dtype when
    `return_hidden`) and the updated cache (None without a cache).
    """
    if decode_attention not in ("plain", "fast"):
        raise ValueError(f"decode_attention must be 'plain' or 'fast', got {decode_attention!r}")
    cdtype = jnp.dtype(compute_dtype)
    B, T = tokens.shape
    Hq, Hkv, D = shape.num_heads, shape.num_kv_heads, shape.head_dim
    eps = shape.rms_norm_eps

    # mode="clip": an out-of-range id in a padding slot (e.g. -1) must not become a NaN row that
    # leaks through 0-weight attention (0 * NaN = NaN); valid ids are unaffected.
    x = jnp.take(params["embed_tokens"]["embedding"], tokens, axis=0, mode="clip").astype(cdtype)
    use_dropout = dropout > 0.0 and dropout_keys is not None
    if use_dropout:
        if cache is not None:
            raise ValueError("dropout is for training forwards, not with a KV cache")
        # per row: one key for the embedding, two per layer (attention, MLP)
        row_keys = jax.vmap(lambda k: jax.random.split(k, 1 + 2 * shape.num_layers))(dropout_keys)  # [B,1+2L,2]
        x = residual_dropout(x, dropout, row_keys[:, 0])
        layer_keys = jnp.moveaxis(row_keys[:, 1:].reshape(B, shape.num_layers, 2, -1), 0, 2)  # [L,2,B,2]
    cos, sin = rope_cos_sin(positions, D, shape.rope_theta)
    mask = mask.astype(bool)

    expected_mask = (B, T) if cache is None else (B, cache["k"].shape[2])
    if mask.shape != expected_mask:
        # A [B,1] decode mask would silently broadcast over every cache slot.
        raise ValueError(
            f"mask has shape {mask.shape}, expected {expected_mask} ([B,T] without a cache, [B,S] with)"
        )
    if cache is None:
        causal = jnp.tril(jnp.ones((T, T), bool))
        allowed = causal[None] & mask[:, None, :]  # [B,T,T]
        index = None
    else:
        if cache_index is None:
            raise ValueError("forward with a cache needs cache_index")
        S = cache["k"].shape[2]
        index = jnp.asarray(cache_index, jnp.int32)
        query_slot = index + jnp.arange(T, dtype=jnp.int32)  # [T]
        key_slot = jnp.arange(S, dtype=jnp.int32)  # [S]
        allowed = (key_slot[None, :] <= query_slot[:, None])[None] & mask[:, None, :]  # [B,T,S]
    use_fast = cache is not None and decode_attention == "fast" and T == 1
    attend = fast_decode_attention if use_fast else plain_attention

    def layer(x, lp, layer_cache, drop_keys=None):
        """One decoder layer.

        layer_cache: None (no cache) or (k_all, v_all, layer_id) with the whole [L,B,S,Hkv,D]
        buffers; returns (x, None) or (x, (k_all, v_all)) with this layer's new slots written.
        drop_keys: None, or [2,B,2] dropout keys (attention output, MLP output).
        """
        drop = (lambda y, i: y) if drop_keys is None else (lambda y, i: residual_dropout(y, dropout, drop_keys[i]))
        h = rms_norm(x, lp["input_layernorm"]["scale"], eps)
        att = lp["self_attn"]
        q = _dense(h, att["q_proj"]["kernel"], att["q_proj"]["bias"]).reshape(B, T, Hq, D)
        k = _dense(h, att["k_proj"]["kernel"], att["k_proj"]["bias"]).reshape(B, T, Hkv, D)
        v = _dense(h, att["v_proj"]["kernel"], att["v_proj"]["bias"]).reshape(B, T, Hkv, D)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if layer_cache is None:
            keys, values, new_kv = k, v, None
        else:
            # Write the new slots into the carried buffers first, then read this layer's slice
            # from the updated buffers: the old buffer is dead after the write, so XLA updates in
            # place and the attention reads the slice without a copy of the cache.
            k_all, v_all, layer_id = layer_cache
            start = (layer_id, 0, index, 0, 0)
            k_all = lax.dynamic_update_slice(k_all, k.astype(k_all.dtype)[None], start)
            v_all = lax.dynamic_update_slice(v_all, v.astype(v_all.dtype)[None], start)
            keys = lax.dynamic_index_in_dim(k_all, layer_id, axis=0, keepdims=False)
            values = lax.dynamic_index_in_dim(v_all, layer_id, axis=0, keepdims=False)
            new_kv = (k_all, v_all)
        out = attend(q, keys, values, allowed).reshape(B, T, Hq * D)
        x = x + drop(_dense(out, att["o_proj"]["kernel"]), 0)
        h = rms_norm(x, lp["post_attention_layernorm"]["scale"], eps)
        mlp = lp["mlp"]
        gated = jax.nn.silu(_dense(h, mlp["gate_proj"]["kernel"])) * _dense(h, mlp["up_proj"]["kernel"])
        x = x + drop(_dense(gated, mlp["down_proj"]["kernel"]), 1)
        return x, new_kv

    if cache is None:
        # remat only matters for training, which never runs with a cache.
        layer_fn = jax.checkpoint(layer) if remat else layer

        def body(x, xs):
            lp, drop_keys = xs
            x, _ = layer_fn(x, lp, None, drop_keys)
            return x, None

        x, _ = lax.scan(body, x, (params["layers"], layer_keys if use_dropout else None))
        new_cache = None
    else:
        # The whole cache rides in the scan carry and each layer writes only its T new slots, so
        # the buffers are updated in place instead of re-stacked every call.
        def body(carry, xs):
            x, k_all, v_all = carry
            lp, layer_id = xs
            x, (k_all, v_all) = layer(x, lp, (k_all, v_all, layer_id))
            return (x, k_all, v_all), None

        layer_ids = jnp.arange(shape.num_layers, dtype=jnp.int32)
        (x, k_all, v_all), _ = lax.scan(body, (x, cache["k"], cache["v"]), (params["layers"], layer_ids))
        new_cache = {"k": k_all, "v": v_all}

    hidden = rms_norm(x, params["norm"]["scale"], eps)
    if return_hidden:
        return hidden, new_cache
    return logits_from_hidden(params, shape, hidden), new_cache


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Left-padding convention: position = cumsum(mask) - 1, clipped at 0 for padding."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)
