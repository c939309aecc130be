"""The optimizer shared by SFT, RL and GRPO: AdamW with warmup, then linear/cosine/constant decay.

Schedule semantics follow Hugging Face's `get_*_schedule_with_warmup` (what upstream MiniOneRec
trains with): during warmup the rate rises linearly from 0 at step 0 to `lr` at `warmup_steps`;
afterwards it decays to `min_lr_ratio * lr` at `total_steps` (linear or half-cosine), or stays at
`lr` (constant). `step` counts optimizer updates already applied, so the first update uses
`lr_at(0)`. Weight decay applies to matrices only (not to norms and biases), as the HF Trainer does.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import optax

from rec.config import TrainConfig
from rec.errors import RecError


def warmup_steps_for(train_cfg: TrainConfig, total_steps: int) -> int:
    if train_cfg.warmup_steps > 0:
        return int(train_cfg.warmup_steps)
    if train_cfg.warmup_ratio < 0 or train_cfg.warmup_ratio > 1:
        raise RecError(f"config: 'train.warmup_ratio' must be in [0, 1], got {train_cfg.warmup_ratio}")
    return int(math.ceil(train_cfg.warmup_ratio * total_steps))


def lr_multiplier(step, *, total_steps: int, warmup_steps: int, schedule: str, min_lr_ratio: float):
    """Fraction of the peak rate at `step` (works on Python numbers and jax scalars)."""
    step = jnp.asarray(step, jnp.float32)
    warm = jnp.float32(max(warmup_steps, 1))
    warmup_value = step / warm
    span = jnp.float32(max(total_steps - warmup_steps, 1))
    progress = jnp.clip((step - warmup_steps) / span, 0.0, 1.0)
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif schedule == "constant":
        decay = jnp.ones_like(progress)
    else:
        raise RecError(f"config: 'train.schedule' must be linear, cosine or constant, got {schedule!r}")
    if schedule != "constant":
        decay = min_lr_ratio + (1.0 - min_lr_ratio) * decay
    return jnp.where(step < warmup_steps, warmup_value, decay)


@dataclass(frozen=True)
class Optimizer:
    """An optax transformation plus the schedule it uses (for logging the rate)."""

    tx: optax.GradientTransformation
    schedule: Callable[[jax.Array], jax.Array]
    total_steps: int
    warmup_steps: int

    def lr_at(self, step: int) -> float:
        return float(self.schedule(step))


def _decay_mask(params):
    # Matrices (and stacked matrices) decay; vectors such as norm scales and biases do not.
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def make_optimizer(train_cfg: TrainConfig, total_steps: int) -> Optimizer:
    """AdamW(b1, b2, eps, weight_decay) on the warmup+decay schedule, after global-norm clipping."""
    if total_steps <= 0:
        raise RecError(
            f"training needs at least one optimizer step, got {total_steps} (check train.steps/epochs)"
        )
    warmup = warmup_steps_for(train_cfg, total_steps)
    peak = float(train_cfg.lr)
    kind, floor = train_cfg.schedule, float(train_cfg.min_lr_ratio)
    if not 0.0 <= floor <= 1.0:
        raise RecError(f"config: 'train.min_lr_ratio' must be in [0, 1], got {floor}")

    def schedule(step):
        return peak * lr_multiplier(
            step, total_steps=total_steps, warmup_steps=warmup, schedule=kind, min_lr_ratio=floor
        )

    parts = []
    if train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    parts.append(
        optax.adamw(
            learning_rate=schedule,
            b1=float(train_cfg.b1),
            b2=float(train_cfg.b2),
            eps=float(train_cfg.eps),
            weight_decay=float(train_cfg.weight_decay),
            mask=_decay_mask,
        )
    )
    return Optimizer(tx=optax.chain(*parts), schedule=schedule, total_steps=total_steps, warmup_steps=warmup)
