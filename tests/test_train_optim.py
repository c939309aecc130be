"""Optimizer schedule and AdamW update against hand-computed values and torch's AdamW."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rec.config import TrainConfig
from rec.errors import RecError
from rec.train.optim import make_optimizer


def _cfg(**kw) -> TrainConfig:
    cfg = TrainConfig()
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_linear_warmup_then_decay_hand_values():
    opt = make_optimizer(_cfg(lr=1e-3, warmup_steps=4, schedule="linear"), total_steps=12)
    # warmup: step/4 * lr; decay: (12 - step)/(12 - 4) * lr (HF get_linear_schedule_with_warmup)
    expected = {0: 0.0, 1: 2.5e-4, 2: 5e-4, 4: 1e-3, 6: 7.5e-4, 8: 5e-4, 11: 1.25e-4, 12: 0.0, 20: 0.0}
    for step, lr in expected.items():
        assert opt.lr_at(step) == pytest.approx(lr, abs=1e-9), step


def test_cosine_with_floor_and_warmup_ratio():
    opt = make_optimizer(
        _cfg(lr=2.0, warmup_steps=0, warmup_ratio=0.1, schedule="cosine", min_lr_ratio=0.1), 100
    )
    assert opt.warmup_steps == 10
    assert opt.lr_at(5) == pytest.approx(1.0)
    assert opt.lr_at(10) == pytest.approx(2.0)
    # halfway through the decay: floor + (1 - floor) * 0.5 * (1 + cos(pi/2)) = 0.1 + 0.45 = 0.55 of peak
    assert opt.lr_at(55) == pytest.approx(2.0 * 0.55, rel=1e-6)
    assert opt.lr_at(100) == pytest.approx(0.2, rel=1e-6)
    assert opt.lr_at(37) == pytest.approx(
        2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 27 / 90))), rel=1e-6
    )


def test_constant_after_warmup_and_bad_values():
    opt = make_optimizer(_cfg(lr=0.5, warmup_steps=2, schedule="constant"), 10)
    assert [round(opt.lr_at(s), 6) for s in (0, 1, 2, 9, 50)] == [0.0, 0.25, 0.5, 0.5, 0.5]
    with pytest.raises(RecError, match="at least one optimizer step"):
        make_optimizer(_cfg(), 0)
    with pytest.raises(RecError, match="min_lr_ratio"):
        make_optimizer(_cfg(min_lr_ratio=2.0), 10)


def test_adamw_clip_and_schedule_match_torch():
    torch = pytest.importorskip("torch")
    cfg = _cfg(
        lr=0.1, warmup_steps=2, schedule="linear", weight_decay=0.05, grad_clip=0.5, b1=0.8, b2=0.95, eps=1e-6
    )
    total = 6
    opt = make_optimizer(cfg, total)
    rng = np.random.default_rng(0)
    w0 = rng.normal(size=(3, 4)).astype(np.float32)
    b0 = rng.normal(size=(4,)).astype(np.float32)
    grads = [
        (rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=(4,)).astype(np.float32))
        for _ in range(5)
    ]

    params = {"w": jnp.asarray(w0), "b": jnp.asarray(b0)}
    state = opt.tx.init(params)
    for gw, gb in grads:
        updates, state = opt.tx.update({"w": jnp.asarray(gw), "b": jnp.asarray(gb)}, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)

    tw = torch.nn.Parameter(torch.tensor(w0))
    tb = torch.nn.Parameter(torch.tensor(b0))
    # Weight decay on matrices only (HF Trainer excludes biases and norms).
    topt = torch.optim.AdamW(
        [{"params": [tw], "weight_decay": 0.05}, {"params": [tb], "weight_decay": 0.0}],
        lr=0.1,
        betas=(0.8, 0.95),
        eps=1e-6,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        topt, lambda s: s / 2 if s < 2 else max(0.0, (total - s) / (total - 2))
    )
    for gw, gb in grads:
        tw.grad = torch.tensor(gw)
        tb.grad = torch.tensor(gb)
        torch.nn.utils.clip_grad_norm_([tw, tb], 0.5)
        topt.step()
        sched.step()
    np.testing.assert_allclose(np.asarray(params["w"]), tw.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(params["b"]), tb.detach().numpy(), rtol=1e-5, atol=1e-6)
