"""Pre-flight memory estimate per chip, and refusing a config that cannot fit.

A v6e chip has 32 GiB of HBM; an out-of-memory error after 20 minutes of compilation and data
loading on 16 chips is an expensive way to learn that `micro_batch_size` was too large. So every
trainer prints, before its first step, what one chip will hold:

- params:      the chip's shard of every parameter (exact: from the partition rules and the mesh);
- optimizer:   its shard of the optimizer state (exact: optax's state shapes, e.g. Adam mu and nu);
- gradients:   the f32 accumulator plus one micro-batch's gradients, both sharded like the params;
- activations: one micro-batch on this chip: with `model.remat` the layer inputs of every layer
               plus one layer's working set recomputed in the backward pass (Q/K/V, f32 attention
               scores and probabilities, the MLP); without remat every layer's working set; plus
               one f32 logits chunk of the chunked cross-entropy (and its gradient), and `extra`
               bytes a stage adds (rollout KV caches).

The activation term is a model of what XLA keeps live, not a measurement: it errs high (XLA fuses
and reuses buffers). The check refuses when the total exceeds the chip's memory, and the message
names the keys to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from rec.errors import RecError

log = logging.getLogger("rec.train")

GIB = float(1 << 30)
LOGITS_CHUNK = 128  # positions per logits block in rec.train.step.chunked_token_logprobs


@dataclass(frozen=True)
class MemoryEstimate:
    params: float  # bytes per chip
    optimizer: float
    gradients: float
    activations: float
    capacity: float | None  # bytes per chip, None when unknown (CPU)

    @property
    def total(self) -> float:
        return self.params + self.optimizer + self.gradients + self.activations

    def describe(self) -> str:
        parts = ", ".join(
            f"{name} {getattr(self, name) / GIB:.2f}"
            for name in ("params", "optimizer", "gradients", "activations")
        )
        room = f" of {self.capacity / GIB:.1f} GiB" if self.capacity else " (chip memory unknown: not checked)"
        return f"{self.total / GIB:.2f} GiB per chip ({parts}){room}"


def shard_bytes(tree: Any) -> float:
    """Bytes one device holds of a tree of arrays/ShapeDtypeStructs that carry shardings (the
    largest shard per leaf; unsharded leaves count whole)."""
    total = 0.0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None and shape:
            shape = tuple(sharding.shard_shape(shape))
        total += float(np.prod(shape, dtype=np.float64)) * np.dtype(leaf.dtype).itemsize
    return total


def activation_bytes(shape, rows: int, seq_len: int, compute_bytes: int, remat: bool, tensor: int = 1) -> float:
    """Live activation bytes of one micro-batch of `rows` sequences of `seq_len` tokens on one
    chip (`tensor` = chips sharing each sequence's heads/MLP)."""
    tokens = float(rows) * seq_len
    hidden = shape.hidden_size
    heads = max(1, shape.num_heads // tensor)
    kv = max(1, shape.num_kv_heads // tensor)
    inter = shape.intermediate_size / tensor
    qkv = tokens * (heads + 2 * kv) * shape.head_dim * compute_bytes
    scores = float(rows) * heads * seq_len * seq_len * 4 * 2  # f32 scores and probabilities
    mlp = tokens * inter * 3 * compute_bytes  # gate, up, their product
    layer = qkv + scores + mlp + tokens * hidden * compute_bytes * 4  # residual, norms, attention out
    if remat:
        layers = shape.num_layers * tokens * hidden * compute_bytes + layer
    else:
        layers = shape.num_layers * layer
    logits = float(rows) * min(LOGITS_CHUNK, seq_len) * shape.vocab_size * 4 * 3
    final = tokens * hidden * 4 * 2  # f32 final hidden and its gradient
    return layers + logits + final


def device_memory_bytes(mesh, configured_gib: float = 0.0) -> float | None:
    """Memory of one chip: `mesh.memory_per_chip_gib` when set, else what the device reports
    (TPU and GPU do; CPU does not: None)."""
    if configured_gib > 0:
        return configured_gib * GIB
    # One of this process's own devices: memory_stats() of another host's device raises, which
    # would leave the check to process 0 alone (and the others waiting for it at the first step).
    device = next((d for d in mesh.devices.flat if d.process_index == jax.process_index()), mesh.devices.flat[0])
    if device.platform == "cpu":
        return None
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 - some runtimes do not implement memory_stats
        return None
    limit = stats.get("bytes_limit") or stats.get("bytes_reservable_limit")
    return float(limit) if limit else None


def estimate(
    state: Any,
    shape,
    mesh,
    micro_rows: int,
    seq_len: int,
    compute_dtype: str,
    remat: bool,
    extra_bytes: float = 0.0,
    configured_gib: float = 0.0,
) -> MemoryEstimate:
    """The estimate for a train state (arrays or ShapeDtypeStructs with shardings) and micro-batches
    of `micro_rows` sequences (global) of `seq_len` tokens."""
    from rec.dist import batch_divisor

    params = shard_bytes(state.params)
    optimizer = shard_bytes(state.opt_state)
    param_elems = sum(
        float(np.prod(leaf.sharding.shard_shape(tuple(leaf.shape)) if leaf.shape else (), dtype=np.float64))
        for leaf in jax.tree.leaves(state.params)
    )
    gradients = param_elems * 4 + params  # f32 accumulator + one micro-batch's gradients
    rows = -(-int(micro_rows) // batch_divisor(mesh))
    acts = activation_bytes(
        shape, rows, int(seq_len), np.dtype(compute_dtype).itemsize, remat, int(mesh.shape.get("tensor", 1))
    )
    return MemoryEstimate(params, optimizer, gradients, acts + float(extra_bytes), device_memory_bytes(mesh, configured_gib))


def check_fits(est: MemoryEstimate, batch_key: str, batch_value: int, length_key: str, length_value: int) -> None:
    """Log the estimate; RecError naming what to change when it exceeds the chip's memory."""
    log.info("memory estimate: %s", est.describe())
    if est.capacity is None or est.total <= est.capacity:
        return
    suggestion = f"lower '{batch_key}' (now {batch_value}"
    if batch_value > 1:
        suggestion += f", e.g. {max(1, batch_value // 2)}"
    suggestion += f") or '{length_key}' (now {length_value})"
    if est.activations < est.total / 2:
        suggestion = "use more chips (mesh.shape) or model.param_dtype=bfloat16; or " + suggestion
    raise RecError(
        f"config: estimated {est.describe()} does not fit; {suggestion}, or set model.remat=true"
    )
