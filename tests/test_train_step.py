"""The shared train step: accumulation equals one big batch; chunked losses equal dense ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rec import dist
from rec.config import TrainConfig
from rec.train.step import (
    IGNORE_INDEX,
    chunked_token_logprobs,
    make_eval_step,
    make_train_step,
    shift_labels,
    split_micro_batches,
    token_cross_entropy,
)
from rec.train.optim import make_optimizer
from rec.train.state import init_state


def _toy_loss(params, micro_batch, extra):
    """Token-mean squared error of a linear map over a masked [B, T, 4] input."""
    pred = micro_batch["x"] @ params["w"] + params["b"]
    err = ((pred - micro_batch["y"]) ** 2).sum(-1) * micro_batch["m"]
    count = micro_batch["m"].sum()
    return err.sum() / jnp.maximum(count, 1.0), {"weight": count, "sq_w": (params["w"] ** 2).sum()}


def _toy_batch(rows=8, seed=0):
    rng = np.random.default_rng(seed)
    mask = (rng.random((rows, 5)) < 0.6).astype(np.float32)
    mask[0] = 0.0  # a row with no target tokens at all
    return {
        "x": rng.normal(size=(rows, 5, 4)).astype(np.float32),
        "y": rng.normal(size=(rows, 5, 3)).astype(np.float32),
        "m": mask,
    }


def _toy_state(seed=0):
    rng = np.random.default_rng(seed + 100)
    params = {"w": jnp.asarray(rng.normal(size=(4, 3)), jnp.float32), "b": jnp.zeros((3,), jnp.float32)}
    mesh = dist.make_mesh("auto")
    params = dist.shard_params(params, mesh, [])
    cfg = TrainConfig(lr=0.05, warmup_steps=0, schedule="constant", grad_clip=1.0)
    opt = make_optimizer(cfg, 10)
    return init_state(params, opt.tx, 0, mesh), opt


def test_split_micro_batches_strides_rows():
    batch = {"a": jnp.arange(12).reshape(6, 2)}
    micro = split_micro_batches(batch, 3)["a"]
    assert micro.shape == (3, 2, 2)
    np.testing.assert_array_equal(micro[1], [[2, 3], [8, 9]])  # rows 1 and 4


@pytest.mark.parametrize("num_micro", [2, 8])
def test_accumulation_equals_one_big_batch(num_micro):
    batch = _toy_batch()
    s1, opt = _toy_state()
    s2, _ = _toy_state()
    big = make_train_step(_toy_loss, opt, 1)
    acc = make_train_step(_toy_loss, opt, num_micro)
    for _ in range(3):
        s1, m1 = big(s1, batch)
        s2, m2 = acc(s2, batch)
        for key in ("loss", "grad_norm", "weight", "sq_w"):
            assert float(m2[key]) == pytest.approx(float(m1[key]), rel=1e-5), key
    np.testing.assert_allclose(np.asarray(s2.params["w"]), np.asarray(s1.params["w"]), rtol=1e-5, atol=1e-6)
    assert int(s2.step) == 3 and int(s2.data_position) == 3


def test_accumulated_loss_is_token_weighted_not_micro_mean():
    """With unequal token counts per micro-batch, the reported loss is the token mean."""
    batch = _toy_batch()
    state, opt = _toy_state()
    params = {k: np.asarray(v) for k, v in state.params.items()}
    pred = batch["x"] @ params["w"] + params["b"]
    err = ((pred - batch["y"]) ** 2).sum(-1) * batch["m"]
    expected = err.sum() / batch["m"].sum()
    _, metrics = make_train_step(_toy_loss, opt, 4)(state, batch)
    assert float(metrics["loss"]) == pytest.approx(float(expected), rel=1e-5)
    assert float(metrics["weight"]) == pytest.approx(float(batch["m"].sum()))
    # the eval step reports the same weighted mean without updating anything
    ev = make_eval_step(_toy_loss, 2)(state.params, batch)
    assert float(ev["loss"]) == pytest.approx(float(expected), rel=1e-5)


def test_empty_batch_gives_zero_not_nan():
    batch = _toy_batch()
    batch["m"][:] = 0.0
    state, opt = _toy_state()
    new, metrics = make_train_step(_toy_loss, opt, 2)(state, batch)
    assert float(metrics["loss"]) == 0.0 and float(metrics["grad_norm"]) == 0.0
    assert np.isfinite(np.asarray(new.params["w"])).all()


def _dense_logits_fn(weight):
    return lambda h: jnp.einsum("bth,hv->btv", h, weight)


@pytest.mark.parametrize("chunk", [3, 7, 64])
def test_chunked_logprobs_equal_dense(chunk):
    rng = np.random.default_rng(1)
    hidden = jnp.asarray(rng.normal(size=(2, 7, 5)), jnp.float32)
    weight = jnp.asarray(rng.normal(size=(5, 11)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 11, size=(2, 7)))
    targets = targets.at[0, 2].set(IGNORE_INDEX)
    got = chunked_token_logprobs(hidden, targets, _dense_logits_fn(weight), chunk)
    logp = jax.nn.log_softmax(hidden @ weight, axis=-1)
    want = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], -1)[..., 0]
    want = jnp.where(targets >= 0, want, 0.0)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    # gradients through the rematerialised chunks equal the dense ones
    g_chunk = jax.grad(lambda w: chunked_token_logprobs(hidden, targets, _dense_logits_fn(w), chunk).sum())(
        weight
    )
    g_dense = jax.grad(
        lambda w: jnp.where(
            targets >= 0,
            jnp.take_along_axis(jax.nn.log_softmax(hidden @ w, -1), jnp.maximum(targets, 0)[..., None], -1)[
                ..., 0
            ],
            0.0,
        ).sum()
    )(weight)
    np.testing.assert_allclose(np.asarray(g_chunk), np.asarray(g_dense), rtol=1e-4, atol=1e-5)


def test_token_cross_entropy_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    hidden = rng.normal(size=(3, 6, 4)).astype(np.float32)
    weight = rng.normal(size=(4, 9)).astype(np.float32)
    labels = rng.integers(0, 9, size=(3, 6))
    labels[:, :3] = IGNORE_INDEX  # prompt
    labels[1, :] = IGNORE_INDEX  # a row with no targets
    loss, aux = token_cross_entropy(
        jnp.asarray(hidden), jnp.asarray(labels), _dense_logits_fn(jnp.asarray(weight)), 4
    )
    logits = torch.tensor(hidden) @ torch.tensor(weight)
    # HF causal LM loss: logits[:, :-1] predict labels[:, 1:]
    ref = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, 9), torch.tensor(labels[:, 1:]).reshape(-1), ignore_index=IGNORE_INDEX
    )
    assert float(loss) == pytest.approx(float(ref), rel=1e-5)
    assert float(aux["weight"]) == float((labels[:, 1:] >= 0).sum())
    np.testing.assert_array_equal(np.asarray(shift_labels(jnp.asarray(labels)))[:, -1], IGNORE_INDEX)
