"""Growing the vocabulary of a model when tokens (the semantic-ID tokens) are added.

New rows start at the mean of the existing true rows (what transformers' `resize_token_embeddings`
centres its mean-resizing on), for the input embedding and, when untied, the LM head. Embedding rows
beyond the true vocabulary (sharding padding) stay zero and their logits stay masked.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from rec.errors import RecError
from rec.model.qwen2 import ModelShape, Params


def _grow_rows(table, old_vocab: int, new_vocab: int, rows: int):
    """table [Vpad_old, H] -> [rows, H]: new ids get the mean of rows [0, old_vocab), padding zero.

    Host numpy tables (fresh from `load_hf`) stay on the host; device arrays stay on device.
    """
    if isinstance(table, np.ndarray):
        mean = table[:old_vocab].astype(np.float32).mean(axis=0).astype(table.dtype)
        out = np.zeros((rows, table.shape[1]), table.dtype)
        out[:old_vocab] = table[:old_vocab]
        out[old_vocab:new_vocab] = mean
        return out
    mean = jnp.mean(table[:old_vocab].astype(jnp.float32), axis=0).astype(table.dtype)
    out = jnp.zeros((rows, table.shape[1]), table.dtype)
    out = out.at[:old_vocab].set(table[:old_vocab])
    return out.at[old_vocab:new_vocab].set(mean)


def grow_vocab(
    params: Params, shape: ModelShape, new_vocab: int, vocab_multiple: int = 1
) -> tuple[ModelShape, Params]:
    """(shape, params) with `new_vocab` true rows; never shrinks (a smaller/equal size is a no-op).

    The padded row count is the larger of the current one and `new_vocab` rounded up to
    `vocab_multiple`.
    """
    new_vocab = int(new_vocab)
    if new_vocab <= 0:
        raise RecError(f"grow_vocab: new vocabulary size must be positive, got {new_vocab}")
    if new_vocab <= shape.vocab_size:
        return shape, params
    new_shape = dataclasses.replace(shape, vocab_size=new_vocab)
    old_rows = int(params["embed_tokens"]["embedding"].shape[0])
    rows = max(old_rows, new_shape.padded_vocab(vocab_multiple))
    out = dict(params)
    out["embed_tokens"] = {
        "embedding": _grow_rows(params["embed_tokens"]["embedding"], shape.vocab_size, new_vocab, rows)
    }
    if not shape.tie_embeddings:
        head = params["lm_head"]["kernel"]  # [H, Vpad]
        out["lm_head"] = {"kernel": _grow_rows(head.T, shape.vocab_size, new_vocab, rows).T}
    return new_shape, out
