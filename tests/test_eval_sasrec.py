"""SASRec baseline: shapes, masking, determinism, and that it learns a next-item rule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rec.eval import sasrec as S
from rec.eval.baselines import score_baselines
from rec.eval.metrics import compute_metrics

N_ITEMS = 24
SIDS = [f"<a_{i}><b_{i % 3}><c_{i % 5}>" for i in range(N_ITEMS)]
SMALL = S.SASRecConfig(max_len=6, hidden=32, layers=1, heads=2, dropout=0.1, lr=5e-3, batch_size=64,
                       max_epochs=40, patience=40)


def _rule_pairs(n: int, seed: int):
    """History of random items; the next item is (last + 7) mod N: a deterministic rule that
    popularity cannot express."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n):
        length = int(rng.integers(1, 6))
        history = [SIDS[int(i)] for i in rng.integers(0, N_ITEMS, length)]
        last = SIDS.index(history[-1])
        pairs.append((history, SIDS[(last + 7) % N_ITEMS]))
    return pairs


def test_encoding_and_shapes():
    vocab = S.item_vocab(SIDS)
    seqs = S.encode_histories([[SIDS[0]], SIDS[:8]], vocab, 6)
    assert seqs.shape == (2, 6) and seqs.dtype == np.int32
    assert list(seqs[0]) == [0, 0, 0, 0, 0, 1]  # left padded, id = index + 1
    assert list(seqs[1]) == [3, 4, 5, 6, 7, 8]  # the last max_len items
    assert list(S.encode_targets([SIDS[5]], vocab)) == [5]
    params = S.init_params(jax.random.PRNGKey(0), N_ITEMS, SMALL)
    assert params["item"].shape == (N_ITEMS + 1, 32) and float(jnp.abs(params["item"][0]).sum()) == 0.0
    hidden = S.encode(params, jnp.asarray(seqs), SMALL.heads)
    logits = S.item_logits(params, jnp.asarray(seqs), SMALL.heads)
    assert hidden.shape == (2, 6, 32) and logits.shape == (2, N_ITEMS)
    assert bool(jnp.isfinite(hidden).all())  # fully padded query rows stay finite
    mask = S.attention_mask(jnp.asarray(seqs))
    assert mask.shape == (2, 1, 6, 6)
    assert not bool(mask[0, 0, 5, :5].any()) and bool(mask[0, 0, 5, 5])  # padding keys are masked
    assert not bool(mask[1, 0, 2, 3:].any())  # causal


def test_padding_does_not_change_the_prediction():
    params = S.init_params(jax.random.PRNGKey(1), N_ITEMS, SMALL)
    a = jnp.asarray([[0, 0, 0, 3, 4, 5]])
    cfg8 = S.SASRecConfig(**{**SMALL.__dict__, "max_len": 6})
    base = S.item_logits(params, a, cfg8.heads)
    # junk ids in padded slots are masked out of attention; only position embeddings of real
    # items matter, so the same real items at the same positions give the same scores
    b = jnp.asarray([[0, 0, 0, 3, 4, 5], [0, 0, 0, 3, 4, 5]])
    np.testing.assert_allclose(np.asarray(S.item_logits(params, b, cfg8.heads))[1], np.asarray(base)[0], rtol=1e-5)


def test_learns_a_next_item_rule():
    train, select, test = _rule_pairs(400, 0), _rule_pairs(40, 1), _rule_pairs(200, 2)
    cfg = S.SASRecConfig(**{**SMALL.__dict__, "max_epochs": 25, "patience": 25})
    result = S.fit(train, select, SIDS, cfg, seed=3)
    predicted = S.predict(result.params, cfg, [h for h, _ in test], SIDS, 10)
    records = [{"output": t + "\n", "predict": p} for (_, t), p in zip(test, predicted, strict=True)]
    metrics = compute_metrics(records, set(SIDS))
    popularity = score_baselines(train, test, SIDS, k=10)["popularity"]
    assert metrics["hr@1"] > 0.8 and metrics["hr@1"] > popularity["hr@10"] + 0.3
    assert result.best_epoch >= 1 and len(result.history) == result.epochs_run


def test_fixed_seed_is_deterministic():
    train, select = _rule_pairs(100, 0), _rule_pairs(20, 1)
    cfg = S.SASRecConfig(**{**SMALL.__dict__, "max_epochs": 2})
    first, again = (S.fit(train, select, SIDS, cfg, seed=3) for _ in range(2))
    for x, y in zip(jax.tree.leaves(first.params), jax.tree.leaves(again.params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert first.history == again.history
    other = S.fit(train, select, SIDS, cfg, seed=4)
    assert not np.array_equal(np.asarray(other.params["pos"]), np.asarray(first.params["pos"]))


def test_early_stopping_keeps_the_best_epoch():
    train, select = _rule_pairs(200, 5), _rule_pairs(40, 6)
    cfg = S.SASRecConfig(**{**SMALL.__dict__, "max_epochs": 12, "patience": 2, "lr": 5e-2})
    result = S.fit(train, select, SIDS, cfg, seed=0)
    scores = [s for _, s in result.history]
    assert result.best_select_ndcg == pytest.approx(max(scores))
    assert result.best_epoch == 1 + int(np.argmax(scores))
    assert result.epochs_run == cfg.max_epochs or result.epochs_run - result.best_epoch == cfg.patience


def test_ndcg_at():
    top = np.asarray([[3, 1, 2], [0, 1, 2], [5, 6, 7]])
    targets = np.asarray([3, 1, 0])
    assert S.ndcg_at(top, targets, 3) == pytest.approx((1.0 + 1 / np.log2(3) + 0.0) / 3)
