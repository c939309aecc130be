"""Orbax checkpoints of the train state under `run_dir/checkpoints/<tag>/<step>/`.

Layout of one checkpoint (an Orbax CheckpointManager step, finalised atomically):

    checkpoints/<tag>/<step>/params/         parameters (sharded arrays, OCDBT)
                              rest/           everything else in the state: optimizer state,
                                              step, rng, data position
                              meta/           JSON: model shape (HF config dict), data position,
                                              config, metrics, stage

- ALL processes call `save` and `restore` with the same arguments: each writes/reads its own
  shards, so no artifact lives only on "the process-0 host". `gs://` paths go straight to GCS:
  arrays through tensorstore, directory operations through etils.epath, which needs `gcsfs`
  (in the `gcs` extra) when TensorFlow is absent. No local staging.
- Training writes through a `Checkpointer`: one open Orbax manager per tag, saves asynchronous
  (`checkpoint.async_save`: the arrays are copied to host memory, then written by a background
  thread while training continues). The resumable tags (`sft_last`, `rl_last`, `grpo_last`) keep
  the newest `checkpoint.keep` steps; the named model tags (`sft_best`, `rl_best`) keep one. A
  step that was not finalised (killed mid-save) is invisible to `latest_step` and its temporary
  directory is removed by the next writer.
- Parameters are their own item, so `load_params` reads them without the optimizer state
  (eval, export, RL initialisation).
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp

from rec import storage
from rec.errors import RecError

log = logging.getLogger("rec.checkpoint")


def _ocp():
    import orbax.checkpoint as ocp

    return ocp


def tag_dir(run_dir: str, tag: str) -> str:
    if not tag or "/" in tag or tag.startswith("."):
        raise RecError(f"checkpoint tag {tag!r} is not a plain name (e.g. sft_best)")
    return storage.join(str(run_dir), "checkpoints", tag)


def _abs(path: str) -> str:
    if storage.is_gcs(path):
        # A GCS emulator (STORAGE_EMULATOR_HOST, as in the tests) must also serve tensorstore,
        # which reads its own variable; gcsfs (directory operations) honours the first.
        emulator = os.environ.get("STORAGE_EMULATOR_HOST", "").strip()
        if emulator and not os.environ.get("TENSORSTORE_GCS_HTTP_URL"):
            os.environ["TENSORSTORE_GCS_HTTP_URL"] = emulator if "://" in emulator else f"http://{emulator}"
        return path
    return os.path.abspath(path)


def _manager(directory: str, create: bool, keep: int = 1, async_save: bool = False):
    ocp = _ocp()
    tag = directory.rstrip("/").rsplit("/", 1)[-1]
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=create,
        enable_async_checkpointing=async_save,
        # A writer removes the temporary directories of saves that never finished (a killed run).
        cleanup_tmp_directories=create,
        # Cross-process barrier names carry the tag: sft_best and sft_last saving the same step
        # at once would otherwise share one barrier and fail on a slow store.
        multiprocessing_options=ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=tag),
    )
    # Handlers named up front: a fresh process (eval, export, RL init) can then read item metadata
    # and restore single items without having saved them first.
    handlers = {
        "params": ocp.StandardCheckpointHandler(),
        "rest": ocp.StandardCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }
    return ocp.CheckpointManager(_abs(directory), options=options, item_handlers=handlers)


def _as_items(state: Any) -> dict:
    """{"params": ..., "rest": {every other top-level entry}} (Orbax items must be trees, not
    bare scalars, and params stay separate so they can be read alone)."""
    items = state.as_dict() if hasattr(state, "as_dict") else dict(state)
    if "params" not in items:
        raise RecError("checkpoint state must have a 'params' item")
    rest = {k: v for k, v in items.items() if k != "params"}
    return {"params": items["params"], "rest": rest} if rest else {"params": items["params"]}


def _from_items(restored: Any, names: tuple[str, ...]) -> dict:
    values = {"params": restored["params"]}
    if "rest" in names:
        values.update(restored["rest"])
    return values


def _save_args(state: Any, tag: str, step: int, meta: dict | None):
    ocp = _ocp()
    args = {name: ocp.args.StandardSave(value) for name, value in _as_items(state).items()}
    args["meta"] = ocp.args.JsonSave(dict(meta or {}, step=step, tag=tag))
    return ocp.args.Composite(**args)


def save(run_dir: str, tag: str, state: Any, step: int, meta: dict | None = None, keep: int = 1) -> str:
    """Write `state` (a TrainState or a dict of pytrees) as step `step` of `tag` and wait until it
    is final; returns the path. (Training loops use the asynchronous `Checkpointer`.)

    Called by every process. `meta` must be JSON-serialisable. Saving a step that already exists
    for the tag is skipped (a resumed run reaching the same step holds the same state).
    """
    with Checkpointer(run_dir, async_save=False) as writer:
        return writer.save(tag, state, step, meta, keep=keep)


class Checkpointer:
    """The checkpoint writer of one run: an open Orbax manager per tag, asynchronous saves.

    Every process creates one and calls `save` with the same arguments (each writes its own
    shards; Orbax finalises the step once all have written). `save` returns once the arrays are
    copied off the devices, so the caller may donate the state's buffers to the next step. A
    new save of a tag first waits for the previous one. `close` (or leaving the `with` block)
    waits for everything in flight.
    """

    def __init__(self, run_dir: str, async_save: bool = True):
        self.run_dir = str(run_dir)
        self.async_save = bool(async_save)
        self._managers: dict[str, Any] = {}
        self._saved: dict[str, int] = {}

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _manager_for(self, tag: str, keep: int):
        if tag not in self._managers:
            self._managers[tag] = _manager(tag_dir(self.run_dir, tag), create=True, keep=keep, async_save=self.async_save)
        return self._managers[tag]

    def save(self, tag: str, state: Any, step: int, meta: dict | None = None, keep: int = 1) -> str:
        """Start writing `state` as step `step` of `tag`, keeping the newest `keep` steps of it."""
        if keep < 1:
            raise RecError(f"checkpoint.keep: must be >= 1, got {keep}")
        manager = self._manager_for(tag, keep)
        step = int(step)
        path = storage.join(tag_dir(self.run_dir, tag), str(step))
        if step in manager.all_steps():
            log.info("checkpoint %s step %d exists; not rewritten", tag, step)
            return path
        manager.save(step, args=_save_args(state, tag, step, meta), force=True)
        self._saved[tag] = step
        if not self.async_save:
            manager.wait_until_finished()
        return path

    def last_saved(self, tag: str) -> int | None:
        """The step most recently saved (or started) for `tag` by this writer, or the newest
        finalised step on storage when this writer has not saved it yet."""
        if tag in self._saved:
            return self._saved[tag]
        return latest_step(self.run_dir, tag)

    def wait(self) -> None:
        """Block until every save in flight is final."""
        for manager in self._managers.values():
            manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            for manager in self._managers.values():
                manager.close()
            self._managers.clear()


def latest_step(run_dir: str, tag: str) -> int | None:
    """The newest finalised step of `tag`, or None when there is none."""
    directory = tag_dir(run_dir, tag)
    if not storage.exists(directory):
        return None
    manager = _manager(directory, create=False)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def read_meta(run_dir: str, tag: str, step: int | None = None) -> dict:
    """The JSON metadata saved with a checkpoint (newest step unless given)."""
    ocp = _ocp()
    step = _resolve_step(run_dir, tag, step)
    with _reading(run_dir, tag, step) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(restored["meta"])


@contextlib.contextmanager
def _reading(run_dir: str, tag: str, step: int):
    """A manager on `tag` for one restore; a checkpoint that cannot be read (a truncated or missing
    file, a tree that does not match) becomes one line naming the step directory."""
    manager = _manager(tag_dir(run_dir, tag), create=False)
    try:
        yield manager
    except RecError:
        raise
    except Exception as exc:  # Orbax/TensorStore wrap the cause in groups and generic exceptions
        raise RecError(f"{tag_dir(run_dir, tag)}/{step}: cannot restore ({_root_message(exc)})") from None
    finally:
        manager.close()


def _root_message(exc: BaseException) -> str:
    """The first line of the innermost error behind `exc` (through exception groups and causes)."""
    while True:
        if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
            exc = exc.exceptions[0]
        elif exc.__cause__ is not None:
            exc = exc.__cause__
        else:
            break
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return first if len(first) <= 300 else first[:300] + "..."


def _resolve_step(run_dir: str, tag: str, step: int | None) -> int:
    if step is None:
        step = latest_step(run_dir, tag)
    if step is None:
        raise RecError(f"{tag_dir(run_dir, tag)}: no checkpoint found")
    return int(step)


def restore(run_dir: str, tag: str, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restore a state onto the shardings of `abstract_state` (ShapeDtypeStructs with shardings,
    e.g. rec.train.state.abstract_state). Returns (state of the same type, meta)."""
    ocp = _ocp()
    step = _resolve_step(run_dir, tag, step)
    items = _as_items(abstract_state)
    args = {name: ocp.args.StandardRestore(value) for name, value in items.items()}
    args["meta"] = ocp.args.JsonRestore()
    with _reading(run_dir, tag, step) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(**args))
    values = _from_items(restored, tuple(items))
    meta = dict(restored["meta"])
    if hasattr(abstract_state, "as_dict"):
        return type(abstract_state).from_dict(values), meta
    return values, meta


def params_metadata(run_dir: str, tag: str, step: int | None = None) -> Any:
    """Shape/dtype tree of the saved parameters (no array data read)."""
    step = _resolve_step(run_dir, tag, step)
    manager = _manager(tag_dir(run_dir, tag), create=False)
    try:
        tree = manager.item_metadata(step)["params"]
    finally:
        manager.close()
    if tree is None:
        raise RecError(f"{tag_dir(run_dir, tag)}/{step}: checkpoint has no params item")
    return getattr(tree, "tree", tree)


def list_tags(run_dir: str) -> list[str]:
    """Tags of `run_dir` with at least one finalised checkpoint."""
    root = storage.join(str(run_dir), "checkpoints")
    if not storage.isdir(root):
        return []
    names = [n for n in storage.listdir(root) if n and not n.startswith(".")]
    return [tag for tag in names if latest_step(run_dir, tag) is not None]


# Which checkpoint "the model of this run" means when no tag is named (export, report).
PREFERRED_TAGS = ("rl_last", "rl_best", "sft_best", "sft_last")


def preferred_tag(run_dir: str) -> str:
    tags = list_tags(run_dir)
    for tag in PREFERRED_TAGS:
        if tag in tags:
            return tag
    if tags:
        return tags[0]
    raise RecError(f"{run_dir}: no checkpoints in this run directory")


def load_params(
    run_dir: str, tag: str, mesh=None, rules=None, step: int | None = None, dtype: str | None = None
):
    """(shape, params) of a checkpoint for inference: parameters only, no optimizer state.

    `tag` "" = the run's preferred model (rl_last, rl_best, sft_best, sft_last: first present).
    Parameters are restored straight onto `mesh` with the partition `rules` (default: all devices
    on "fsdp" and the model's PARTITION_RULES). `dtype` ("bfloat16"/"float32") casts on restore.
    """
    ocp = _ocp()
    from rec import dist
    from rec.model.qwen2 import PARTITION_RULES, ModelShape

    tag = tag or preferred_tag(run_dir)
    step = _resolve_step(run_dir, tag, step)
    meta = read_meta(run_dir, tag, step)
    if "model_config" not in meta:
        raise RecError(f"{tag_dir(run_dir, tag)}/{step}: checkpoint metadata has no model_config")
    shape = ModelShape.from_hf_config(meta["model_config"])
    mesh = mesh if mesh is not None else dist.make_mesh("auto")
    rules = PARTITION_RULES if rules is None else rules
    saved = params_metadata(run_dir, tag, step)
    target_dtype = None if not dtype else jnp.dtype(dtype)
    abstract = jax.tree.map(
        lambda m: jax.ShapeDtypeStruct(tuple(m.shape), target_dtype or m.dtype), saved, is_leaf=_is_array_meta
    )
    shardings = dist.param_shardings(abstract, mesh, rules)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings
    )
    with _reading(run_dir, tag, step) as manager:
        restored = manager.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    return shape, restored["params"]


def _is_array_meta(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def read_arrays(run_dir: str, tag: str, step: int | None = None) -> dict:
    """Every array of a checkpoint as host numpy, independent of the mesh that wrote it:
    {"params": tree, "rest": tree} (for comparisons and debugging; training restores with
    `restore` onto a mesh instead)."""
    import numpy as np

    ocp = _ocp()
    step = _resolve_step(run_dir, tag, step)
    with _reading(run_dir, tag, step) as manager:
        metadata = manager.item_metadata(step)
        out = {}
        reader = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        try:
            for name in ("params", "rest"):
                tree = metadata.get(name) if hasattr(metadata, "get") else None
                if tree is None:
                    continue
                tree = getattr(tree, "tree", tree)
                restore_args = jax.tree.map(
                    lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree, is_leaf=_is_array_meta
                )
                path = storage.join(_abs(tag_dir(run_dir, tag)), str(step), name)
                out[name] = reader.restore(path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
        finally:
            reader.close()
    return out
