"""Hugging Face Qwen2 model directories in and out (config.json + safetensors).

`load_hf` reads a single `model.safetensors` or shards listed by `model.safetensors.index.json`
(bf16, f16 or f32 tensors), maps HF names to our stacked parameter tree (see `rec.model.qwen2`)
and checks every shape; a checkpoint without `lm_head.weight` has tied embeddings. `save_hf` writes
the reverse (dropping padded vocabulary rows, omitting `lm_head` when tied, sharding above a size
threshold) so `transformers.AutoModelForCausalLM.from_pretrained` reads it back. `export_model` is
`rec export`: an HF directory or a run directory checkpoint -> an HF directory with the tokenizer.
Paths may be local or gs://.
"""

from __future__ import annotations

import dataclasses
import json
import os
import posixpath
import sys
from collections.abc import Iterator
from typing import Any

import ml_dtypes
import numpy as np
from tqdm import tqdm

from rec import storage
from rec.errors import RecError
from rec.model.qwen2 import ModelShape, Params

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 2 * 1024**3
# Files of a model directory that save_hf writes itself (never copied from the tokenizer directory);
# generation_config.json does get copied, it carries the eos ids generation needs.
_MODEL_FILES = {CONFIG, INDEX}
_MODEL_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5")

_NP_DTYPES = {
    "float32": np.dtype(np.float32),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
}


def _np_dtype(dtype: Any, what: str) -> np.dtype:
    name = np.dtype(dtype).name if not isinstance(dtype, str) else dtype
    if name not in _NP_DTYPES:
        raise RecError(f"{what}: unsupported dtype {name!r} (choose from {', '.join(_NP_DTYPES)})")
    return _NP_DTYPES[name]


# --------------------------------------------------------------------------------------------
# Name mapping


def _layer_tensors(shape: ModelShape) -> list[tuple[str, tuple[str, ...], tuple[int, ...], bool]]:
    """(HF suffix after model.layers.{i}., our path under layers/, HF shape, transposed) per layer tensor."""
    H, inter = shape.hidden_size, shape.intermediate_size
    q_dim, kv_dim = shape.num_heads * shape.head_dim, shape.num_kv_heads * shape.head_dim
    return [
        ("input_layernorm.weight", ("input_layernorm", "scale"), (H,), False),
        ("self_attn.q_proj.weight", ("self_attn", "q_proj", "kernel"), (q_dim, H), True),
        ("self_attn.q_proj.bias", ("self_attn", "q_proj", "bias"), (q_dim,), False),
        ("self_attn.k_proj.weight", ("self_attn", "k_proj", "kernel"), (kv_dim, H), True),
        ("self_attn.k_proj.bias", ("self_attn", "k_proj", "bias"), (kv_dim,), False),
        ("self_attn.v_proj.weight", ("self_attn", "v_proj", "kernel"), (kv_dim, H), True),
        ("self_attn.v_proj.bias", ("self_attn", "v_proj", "bias"), (kv_dim,), False),
        ("self_attn.o_proj.weight", ("self_attn", "o_proj", "kernel"), (H, q_dim), True),
        ("post_attention_layernorm.weight", ("post_attention_layernorm", "scale"), (H,), False),
        ("mlp.gate_proj.weight", ("mlp", "gate_proj", "kernel"), (inter, H), True),
        ("mlp.up_proj.weight", ("mlp", "up_proj", "kernel"), (inter, H), True),
        ("mlp.down_proj.weight", ("mlp", "down_proj", "kernel"), (H, inter), True),
    ]


def _set_path(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _get_path(tree: dict, path: tuple[str, ...]):
    for name in path:
        tree = tree[name]
    return tree


# --------------------------------------------------------------------------------------------
# Loading


def read_hf_config(model_dir: str) -> dict:
    path = storage.join(model_dir, CONFIG)
    if not storage.exists(path):
        raise RecError(f"{path}: not found (not a Hugging Face model directory)")
    try:
        config = json.loads(storage.read_text(path))
    except json.JSONDecodeError as exc:
        raise RecError(f"{path}: invalid JSON at line {exc.lineno}: {exc.msg}") from None
    if not isinstance(config, dict):
        raise RecError(f"{path}: expected a JSON object")
    return config


def _tensor_files(model_dir: str) -> dict[str, str]:
    """HF tensor name -> local safetensors file path."""
    from safetensors import safe_open

    index_path = os.path.join(model_dir, INDEX)
    single_path = os.path.join(model_dir, SINGLE)
    if os.path.exists(index_path):
        try:
            index = json.loads(open(index_path, encoding="utf-8").read())
            weight_map = index["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise RecError(f"{index_path}: not a safetensors index (needs a 'weight_map' object)") from None
        files = {}
        for name, fname in weight_map.items():
            path = os.path.join(model_dir, fname)
            if not os.path.exists(path):
                raise RecError(f"{index_path}: shard {fname} (for {name}) not found")
            files[name] = path
        return files
    if os.path.exists(single_path):
        try:
            with safe_open(single_path, framework="numpy") as f:
                return {name: single_path for name in f.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise RecError(f"{single_path}: not a readable safetensors file ({exc})") from None
    raise RecError(f"{model_dir}: no {SINGLE} or {INDEX} (only safetensors checkpoints are supported)")


class _Reader:
    """Reads tensors by HF name from the right shard, keeping one shard open at a time."""

    def __init__(self, files: dict[str, str], listing: str, local_dir: str, model_dir: str):
        self.files = files
        self.listing = listing  # the file that lists the tensors (index or the single file), for errors
        self._local_dir, self._model_dir = local_dir, model_dir
        self._open_path: str | None = None
        self._handle = None

    def _shown(self, path: str) -> str:
        """The user's name for a file (its gs:// URL when the directory was downloaded)."""
        return storage.join(self._model_dir, os.path.relpath(path, self._local_dir))

    def has(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str, expected: tuple[int, ...]) -> np.ndarray:
        from safetensors import safe_open

        if name not in self.files:
            raise RecError(f"{self.listing}: missing tensor {name!r}")
        path = self.files[name]
        if path != self._open_path:
            self._handle = safe_open(path, framework="numpy")
            self._open_path = path
        try:
            array = self._handle.get_tensor(name)
        except Exception as exc:
            raise RecError(f"{self._shown(path)}: cannot read tensor {name!r} ({exc})") from None
        if tuple(array.shape) != tuple(expected):
            raise RecError(
                f"{self._shown(path)}: tensor {name!r} has shape {list(array.shape)}, "
                f"config.json implies {list(expected)}"
            )
        return array


def load_hf(
    model_dir: str, param_dtype: Any = "float32", vocab_multiple: int = 1, progress: bool = True
) -> tuple[ModelShape, Params]:
    """(shape, params) from a HF Qwen2 directory; embedding rows padded to `vocab_multiple`.

    The arrays are host numpy arrays (bfloat16 via ml_dtypes): nothing lands on an accelerator
    until the caller places the tree on its mesh (`rec.dist.shard_params`), so a model larger than
    one chip's memory still loads.
    """
    np_dtype = _np_dtype(param_dtype, "param_dtype")
    config = read_hf_config(model_dir)
    shape = ModelShape.from_hf_config(config, source=storage.join(model_dir, CONFIG))
    # Every array below is a copy (astype / filled buffers), so the download can go at the end.
    with storage.local_copy(model_dir) as local_dir:
        index_path = os.path.join(local_dir, INDEX)
        listing = storage.join(model_dir, INDEX if os.path.exists(index_path) else SINGLE)
        reader = _Reader(_tensor_files(local_dir), listing, local_dir, model_dir)

        L, H, V = shape.num_layers, shape.hidden_size, shape.vocab_size
        vpad = shape.padded_vocab(vocab_multiple)
        tied = shape.tie_embeddings or not reader.has("lm_head.weight")
        if tied != shape.tie_embeddings:
            # No lm_head in the files: HF would tie (small Qwen2.5 checkpoints), so do we.
            shape = dataclasses.replace(shape, tie_embeddings=True)

        params: dict = {}
        per_layer = _layer_tensors(shape)
        total = L * len(per_layer) + 2 + (0 if tied else 1)
        bar = tqdm(
            total=total,
            desc=f"load {os.path.basename(model_dir.rstrip('/'))}",
            file=sys.stderr,
            disable=not progress,
            leave=False,
        )

        embedding = np.zeros((vpad, H), np_dtype)
        embedding[:V] = reader.get("model.embed_tokens.weight", (V, H)).astype(np_dtype)
        params["embed_tokens"] = {"embedding": embedding}
        bar.update()
        # Stacked [L, ...] buffers filled layer by layer (no list-then-stack copy).
        stacked = {}
        for suffix, _, hf_shape, transposed in per_layer:
            ours = hf_shape[::-1] if transposed else hf_shape
            stacked[suffix] = np.empty((L, *ours), np_dtype)
        for i in range(L):
            for suffix, _, hf_shape, transposed in per_layer:
                array = reader.get(f"model.layers.{i}.{suffix}", hf_shape)
                stacked[suffix][i] = (array.T if transposed else array).astype(np_dtype)
                bar.update()
        layers: dict = {}
        for suffix, path, _, _ in per_layer:
            _set_path(layers, path, stacked[suffix])
        params["layers"] = layers
        params["norm"] = {"scale": reader.get("model.norm.weight", (H,)).astype(np_dtype)}
        bar.update()
        if not tied:
            head = np.zeros((H, vpad), np_dtype)
            head[:, :V] = reader.get("lm_head.weight", (V, H)).T.astype(np_dtype)
            params["lm_head"] = {"kernel": head}
            bar.update()
        bar.close()
    return shape, params


# --------------------------------------------------------------------------------------------
# Saving


def _hf_tensors(shape: ModelShape, params: Params, np_dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, array) in checkpoint order, converted lazily (one tensor in host memory at a time)."""
    V = shape.vocab_size

    def host(x) -> np.ndarray:
        return np.asarray(x)

    embedding = params["embed_tokens"]["embedding"]
    yield "model.embed_tokens.weight", host(embedding[:V]).astype(np_dtype)
    per_layer = _layer_tensors(shape)
    for i in range(shape.num_layers):
        for suffix, path, _, transposed in per_layer:
            array = host(_get_path(params["layers"], path)[i])
            yield (
                f"model.layers.{i}.{suffix}",
                np.ascontiguousarray(array.T if transposed else array).astype(np_dtype),
            )
    yield "model.norm.weight", host(params["norm"]["scale"]).astype(np_dtype)
    if not shape.tie_embeddings:
        yield (
            "lm_head.weight",
            np.ascontiguousarray(host(params["lm_head"]["kernel"])[:, :V].T).astype(np_dtype),
        )


def _tensor_nbytes(shape: ModelShape, itemsize: int) -> list[tuple[str, int]]:
    H, V = shape.hidden_size, shape.vocab_size
    sizes = [("model.embed_tokens.weight", V * H)]
    for i in range(shape.num_layers):
        for suffix, _, hf_shape, _ in _layer_tensors(shape):
            sizes.append((f"model.layers.{i}.{suffix}", int(np.prod(hf_shape))))
    sizes.append(("model.norm.weight", H))
    if not shape.tie_embeddings:
        sizes.append(("lm_head.weight", V * H))
    return [(name, n * itemsize) for name, n in sizes]


def _plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Greedy split in checkpoint order; a tensor bigger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name, nbytes in sizes:
        if shards[-1] and used + nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes
    return shards


def _check_params(shape: ModelShape, params: Params) -> None:
    embedding = params["embed_tokens"]["embedding"]
    if embedding.shape[0] < shape.vocab_size or embedding.shape[1] != shape.hidden_size:
        raise RecError(
            f"params: embedding {tuple(embedding.shape)} does not fit vocab_size={shape.vocab_size}, "
            f"hidden_size={shape.hidden_size}"
        )
    if not shape.tie_embeddings and "lm_head" not in params:
        raise RecError("params: untied shape but no lm_head/kernel")


def _remove_stale(out_dir: str, keep: set[str]) -> None:
    """Delete weight files of an earlier export that the new one does not overwrite."""
    stale = [
        n
        for n in (storage.listdir(out_dir) if storage.isdir(out_dir) else [])
        if (n.endswith(".safetensors") or n == INDEX) and n not in keep
    ]
    for name in stale:
        path = storage.join(out_dir, name)
        if storage.is_gcs(path):
            bucket, blob = storage.split_gcs(path)
            storage.gcs_client().bucket(bucket).blob(blob).delete()
        else:
            os.unlink(path)


def copy_tokenizer_files(tokenizer_dir: str, out_dir: str) -> list[str]:
    """Copy the tokenizer files (and generation_config.json, not weights/config) into `out_dir`."""
    copied = []
    for name in storage.listdir(tokenizer_dir):
        src = storage.join(tokenizer_dir, name)
        if name in _MODEL_FILES or name.endswith(_MODEL_SUFFIXES) or name.startswith("."):
            continue
        if storage.isdir(src):
            continue
        storage.write_bytes(storage.join(out_dir, name), storage.read_bytes(src))
        copied.append(name)
    return copied


def save_hf(
    out_dir: str,
    shape: ModelShape,
    params: Params,
    dtype: str = "bfloat16",
    tokenizer_dir: str | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> str:
    """Write `params` as a HF Qwen2 directory; returns `out_dir`.

    Each file is written atomically; config.json is written last, so a directory with a config.json
    is complete. One `model.safetensors` when the weights fit in `max_shard_bytes`, otherwise
    `model-0000i-of-0000n.safetensors` plus `model.safetensors.index.json`.
    """
    from safetensors.numpy import save as st_save

    np_dtype = _np_dtype(dtype, "dtype")
    _check_params(shape, params)
    storage.makedirs(out_dir)
    sizes = _tensor_nbytes(shape, np_dtype.itemsize)
    shards = _plan_shards(sizes, max_shard_bytes)
    n = len(shards)
    file_of = {}
    for i, names in enumerate(shards):
        fname = SINGLE if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        for name in names:
            file_of[name] = fname
    keep = set(file_of.values()) | ({INDEX} if n > 1 else set())
    _remove_stale(out_dir, keep)

    tensors = _hf_tensors(shape, params, np_dtype)
    bar = tqdm(
        total=len(sizes),
        desc=f"save {os.path.basename(out_dir.rstrip('/'))}",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )
    metadata = {"format": "pt"}  # transformers' loader expects this tag
    for names in shards:
        chunk = {}
        for expected in names:
            name, array = next(tensors)
            assert name == expected, (name, expected)  # plan and generator walk the same order
            chunk[name] = array
            bar.update()
        storage.write_bytes(storage.join(out_dir, file_of[names[0]]), st_save(chunk, metadata=metadata))
        del chunk
    bar.close()
    if n > 1:
        index = {
            "metadata": {"total_size": sum(b for _, b in sizes)},
            "weight_map": dict(sorted(file_of.items())),
        }
        storage.write_text(storage.join(out_dir, INDEX), json.dumps(index, indent=2) + "\n")
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, out_dir)
    storage.write_text(storage.join(out_dir, CONFIG), json.dumps(shape.to_hf_config(dtype), indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------
# rec export


def is_hf_dir(path: str) -> bool:
    return storage.exists(storage.join(path, CONFIG))


def export_model(model_path: str, out: str, checkpoint: str = "", dtype: str = "bfloat16") -> str:
    """`rec export`: an HF directory or a run directory (checkpoint tag) -> HF directory `out`."""
    _np_dtype(dtype, "--dtype")
    storage.refuse_foreign_output(out, "--out", is_hf_dir, "model export (config.json)")
    if is_hf_dir(model_path):
        if checkpoint:
            raise RecError(
                f"{model_path}: --checkpoint applies to run directories, this is a Hugging Face directory"
            )
        # Loading in the export dtype is lossless for bf16 checkpoints and halves host memory.
        shape, params = load_hf(model_path, param_dtype=dtype)
        tokenizer_dir = model_path
    elif storage.exists(storage.join(model_path, "checkpoints")) or storage.exists(
        storage.join(model_path, "config.yaml")
    ):
        from rec.checkpoint import load_params

        shape, params = load_params(model_path, checkpoint, dtype=dtype)
        tokenizer_dir = storage.join(model_path, "tokenizer")
        if not storage.isdir(tokenizer_dir):
            tokenizer_dir = None
    else:
        raise RecError(
            f"{model_path}: neither a Hugging Face model directory (config.json) nor a run directory"
        )
    if posixpath.normpath(str(out)) == posixpath.normpath(str(model_path)):
        raise RecError(f"{out}: export target is the source directory")
    save_hf(out, shape, params, dtype=dtype, tokenizer_dir=tokenizer_dir)
    return out
