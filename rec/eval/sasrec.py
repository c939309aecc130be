"""SASRec (Kang & McAuley 2018) in plain JAX + optax: the sequential baseline of `rec baselines`.

Items are the catalogue's distinct SID strings (the metric compares SIDs, so colliding items are
one class): id 0 is padding, ids 1..N the SIDs in `sids` order. A row's input is the last
`max_len` history items, left padded; learned absolute position embeddings (the last item always
sits at position max_len - 1); `layers` pre-LN blocks of causal multi-head self-attention and a
GELU feed-forward, dropout on embeddings and after each sub-block; a final LayerNorm. The hidden
state of the last position scores every item against the (tied) item embeddings: full-softmax
cross entropy over all N items, one target per training row (the rows already hold every prefix
window, rec/data/windows.py).

Training: Adam, fixed batch order from the seed, one pass over the rows per epoch; after each
epoch NDCG@10 on the selection rows (a held-out slice of the training data, never the evaluated
split); the best epoch's parameters are kept and training stops after `patience` epochs without
improvement. Everything is a pure function of (rows, config, seed).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rec.errors import RecError


@dataclass(frozen=True)
class SASRecConfig:
    max_len: int = 10  # history items read (the MiniOneRec histories hold at most 10)
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    dropout: float = 0.3
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 200
    patience: int = 10  # epochs without a better selection NDCG@10 before stopping
    select_k: int = 10


# ---------------------------------------------------------------------------------------------
# Data


def item_vocab(sids: Sequence[str]) -> dict[str, int]:
    """SID -> id (1..N; 0 is padding). `sids` must be distinct."""
    vocab = {sid: i + 1 for i, sid in enumerate(sids)}
    if len(vocab) != len(sids):
        raise RecError("sasrec: item list has duplicate SIDs")
    return vocab


def encode_histories(histories: Sequence[Sequence[str]], vocab: dict[str, int], max_len: int) -> np.ndarray:
    """[N, max_len] int32: the last max_len history ids, left padded with 0."""
    out = np.zeros((len(histories), max_len), dtype=np.int32)
    for row, history in enumerate(histories):
        ids = [vocab[s] for s in history][-max_len:]
        if ids:
            out[row, max_len - len(ids) :] = ids
    return out


def encode_targets(targets: Sequence[str], vocab: dict[str, int]) -> np.ndarray:
    """[N] int32 class index in 0..N-1 (item id - 1)."""
    return np.asarray([vocab[t] - 1 for t in targets], dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# Model (pure functions over a dict of arrays)


def init_params(key, n_items: int, cfg: SASRecConfig) -> dict:
    d, L = cfg.hidden, cfg.layers
    keys = jax.random.split(key, 8)

    def normal(k, shape, std):
        return std * jax.random.normal(k, shape, jnp.float32)

    std = 1.0 / math.sqrt(d)
    return {
        "item": normal(keys[0], (n_items + 1, d), std).at[0].set(0.0),
        "pos": normal(keys[1], (cfg.max_len, d), std),
        "ln1": {"scale": jnp.ones((L, d)), "bias": jnp.zeros((L, d))},
        "ln2": {"scale": jnp.ones((L, d)), "bias": jnp.zeros((L, d))},
        "qkv": normal(keys[2], (L, d, 3 * d), std),
        "qkv_b": jnp.zeros((L, 3 * d)),
        "out": normal(keys[3], (L, d, d), std),
        "out_b": jnp.zeros((L, d)),
        "ff1": normal(keys[4], (L, d, d), std),
        "ff1_b": jnp.zeros((L, d)),
        "ff2": normal(keys[5], (L, d, d), std),
        "ff2_b": jnp.zeros((L, d)),
        "final": {"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))},
    }


def layer_norm(x, scale, bias, eps: float = 1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias


def _dropout(x, rate: float, key, train: bool):
    if not train or rate <= 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0.0)


def attention_mask(seqs):
    """[B, 1, T, T] bool: query t sees keys s <= t that are not padding."""
    T = seqs.shape[1]
    causal = jnp.tril(jnp.ones((T, T), dtype=bool))
    return causal[None, None] & (seqs > 0)[:, None, None, :]


def encode(params: dict, seqs, heads: int, dropout: float = 0.0, key=None, train: bool = False):
    """Hidden state of every position [B, T, d] (final LayerNorm applied)."""
    B, T = seqs.shape
    d = params["item"].shape[1]
    hd = d // heads
    pad = (seqs > 0)[..., None].astype(jnp.float32)
    x = params["item"][seqs] * math.sqrt(d) + params["pos"][None, :T]
    key = key if key is not None else jax.random.PRNGKey(0)
    key, k0 = jax.random.split(key)
    x = _dropout(x, dropout, k0, train) * pad
    mask = attention_mask(seqs)
    n_layers = params["qkv"].shape[0]
    for layer in range(n_layers):
        key, k1, k2 = jax.random.split(key, 3)
        h = layer_norm(x, params["ln1"]["scale"][layer], params["ln1"]["bias"][layer])
        qkv = h @ params["qkv"][layer] + params["qkv_b"][layer]
        q, k, v = (t.reshape(B, T, heads, hd).transpose(0, 2, 1, 3) for t in jnp.split(qkv, 3, axis=-1))
        scores = (q @ k.transpose(0, 1, 3, 2)) / math.sqrt(hd)
        # a finite fill keeps fully padded query rows finite (they are never read)
        scores = jnp.where(mask, scores, -1e9)
        att = jax.nn.softmax(scores, axis=-1) @ v
        att = att.transpose(0, 2, 1, 3).reshape(B, T, d) @ params["out"][layer] + params["out_b"][layer]
        x = x + _dropout(att, dropout, k1, train)
        h = layer_norm(x, params["ln2"]["scale"][layer], params["ln2"]["bias"][layer])
        ff = jax.nn.gelu(h @ params["ff1"][layer] + params["ff1_b"][layer]) @ params["ff2"][layer] + params["ff2_b"][layer]
        x = (x + _dropout(ff, dropout, k2, train)) * pad
    return layer_norm(x, params["final"]["scale"], params["final"]["bias"])


def item_logits(params: dict, seqs, heads: int, dropout: float = 0.0, key=None, train: bool = False):
    """[B, N] scores of every item for the next position (padding id excluded)."""
    hidden = encode(params, seqs, heads, dropout, key, train)[:, -1]
    return hidden @ params["item"][1:].T


def loss_fn(params: dict, seqs, targets, weights, heads: int, dropout: float, key):
    """Weighted mean full-softmax cross entropy of the next item."""
    logits = item_logits(params, seqs, heads, dropout, key, train=True)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[:, None], axis=-1)[:, 0]
    return (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def make_optimizer(cfg: SASRecConfig):
    return optax.adamw(cfg.lr, weight_decay=cfg.weight_decay) if cfg.weight_decay else optax.adam(cfg.lr)


@functools.lru_cache(maxsize=8)
def make_step(cfg: SASRecConfig):
    """Jitted (params, opt_state, seqs, targets, weights, key) -> (params, opt_state, loss);
    cached per config so seeds and refits share one compilation."""
    tx = make_optimizer(cfg)

    @jax.jit
    def step(params, opt_state, seqs, targets, weights, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, seqs, targets, weights, cfg.heads, cfg.dropout, key)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@functools.lru_cache(maxsize=8)
def make_topk(cfg: SASRecConfig, k: int):
    @jax.jit
    def topk(params, seqs):
        return jax.lax.top_k(item_logits(params, seqs, cfg.heads), k)[1]

    return topk


def top_items(params: dict, cfg: SASRecConfig, seqs: np.ndarray, k: int, batch: int = 512, topk_fn=None) -> np.ndarray:
    """[N, k] class indices, best first, in fixed-size batches (one compile)."""
    fn = topk_fn or make_topk(cfg, k)
    out = []
    for start in range(0, len(seqs), batch):
        part = seqs[start : start + batch]
        n = len(part)
        if n < batch:
            part = np.concatenate([part, np.zeros((batch - n, seqs.shape[1]), np.int32)])
        out.append(np.asarray(fn(params, part))[:n])
    return np.concatenate(out) if out else np.zeros((0, k), np.int32)


def ndcg_at(top: np.ndarray, targets: np.ndarray, k: int) -> float:
    """Mean NDCG@k of class rankings (one relevant item per row)."""
    hits = top[:, :k] == targets[:, None]
    ranks = np.argmax(hits, axis=1)
    gains = np.where(hits.any(axis=1), 1.0 / np.log2(ranks + 2.0), 0.0)
    return float(gains.mean()) if len(gains) else 0.0


# ---------------------------------------------------------------------------------------------
# Fit and predict


@dataclass
class FitResult:
    params: dict
    best_epoch: int
    epochs_run: int
    best_select_ndcg: float
    history: list  # per epoch: (train loss, selection NDCG@k)


def fit(
    train_pairs: Sequence[tuple[Sequence[str], str]],
    select_pairs: Sequence[tuple[Sequence[str], str]],
    sids: Sequence[str],
    cfg: SASRecConfig = SASRecConfig(),
    seed: int = 0,
    progress: bool = False,
) -> FitResult:
    """Train on (history, target) pairs; early-stop on the selection pairs (none: run max_epochs)."""
    if not train_pairs:
        raise RecError("sasrec: no training rows")
    if cfg.hidden % cfg.heads:
        raise RecError(f"sasrec: hidden ({cfg.hidden}) must be a multiple of heads ({cfg.heads})")
    vocab = item_vocab(sids)
    seqs = encode_histories([h for h, _ in train_pairs], vocab, cfg.max_len)
    targets = encode_targets([t for _, t in train_pairs], vocab)
    sel_seqs = encode_histories([h for h, _ in select_pairs], vocab, cfg.max_len)
    sel_targets = encode_targets([t for _, t in select_pairs], vocab)

    key = jax.random.PRNGKey(seed)
    key, init_key = jax.random.split(key)
    params = init_params(init_key, len(sids), cfg)
    opt_state = make_optimizer(cfg).init(params)
    step = make_step(cfg)
    k_sel = min(cfg.select_k, len(sids))
    topk_fn = make_topk(cfg, k_sel)
    rng = np.random.default_rng(seed)
    n, bs = len(seqs), cfg.batch_size
    best = (-1.0, 0, params)
    history = []
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=cfg.max_epochs, desc=f"sasrec seed {seed}", unit="epoch", leave=False)
    epoch = 0
    for epoch in range(1, cfg.max_epochs + 1):
        order = rng.permutation(n)
        losses = []
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            weights = np.ones(bs, np.float32)
            if len(idx) < bs:  # fixed shapes: pad the last batch with weight-0 rows
                weights[len(idx) :] = 0.0
                idx = np.concatenate([idx, np.resize(idx, bs - len(idx))])
            key, sub = jax.random.split(key)
            params, opt_state, loss = step(params, opt_state, seqs[idx], targets[idx], weights, sub)
            losses.append(float(loss))
        train_loss = float(np.mean(losses))
        score = ndcg_at(top_items(params, cfg, sel_seqs, k_sel, topk_fn=topk_fn), sel_targets, k_sel) if len(sel_seqs) else -train_loss
        history.append((train_loss, score))
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{train_loss:.3f}", sel_ndcg=f"{score:.4f}")
        if score > best[0]:
            best = (score, epoch, params)
        elif epoch - best[1] >= cfg.patience:
            break
    if bar is not None:
        bar.close()
    return FitResult(params=best[2], best_epoch=best[1], epochs_run=epoch, best_select_ndcg=best[0], history=history)


def predict(params: dict, cfg: SASRecConfig, histories: Sequence[Sequence[str]], sids: Sequence[str], k: int) -> list[list[str]]:
    """Top-k SID strings per history, best first."""
    vocab = item_vocab(sids)
    k = min(k, len(sids))
    top = top_items(params, cfg, encode_histories(histories, vocab, cfg.max_len), k)
    return [[sids[i] for i in row] for row in top]
