"""The handoff carries a real Orbax checkpoint written by rec.checkpoint: run dir -> gs:// handoff
(the upload Job) -> local handoff, then verified and loaded as the eval job would."""

from __future__ import annotations

import numpy as np
import pytest

from rec import storage
from rec.storage import handoff


def test_real_checkpoint_round_trip_through_gcs_handoff(gcs_bucket, tmp_path):
    jax = pytest.importorskip("jax")
    from rec import checkpoint
    from rec.model.qwen2 import SHAPES, init_params

    shape = SHAPES["tiny"]
    params = init_params(shape, jax.random.PRNGKey(3), "float32")
    run = str(tmp_path / "run")
    checkpoint.save(run, "rl_last", {"params": params}, step=5, meta={"model_config": shape.to_hf_config()})
    storage.write_text(f"{run}/tokenizer/tokenizer_config.json", "{}")
    storage.write_text(f"{run}/config.yaml", "run:\n  dir: x\n")

    gcs_handoff = f"gs://{gcs_bucket}/handoff/industrial/r1/rl_last"
    published = handoff.publish(run, gcs_handoff, "rl_last", progress=False)
    assert published["checkpoint"] == f"{gcs_handoff}/checkpoints/rl_last/5"
    assert published["objects"] > 5  # an Orbax tree is many objects
    handoff.verify(gcs_handoff)

    # A handoff has the shape of a run directory, so it can itself be published (here to local disk).
    local_handoff = str(tmp_path / "handoff")
    handoff.publish(gcs_handoff, local_handoff, "rl_last", progress=False)
    ckpt = handoff.verify(local_handoff)
    assert ckpt.endswith("checkpoints/rl_last/5")

    loaded_shape, loaded = checkpoint.load_params(local_handoff, "rl_last")
    assert loaded_shape.hidden_size == shape.hidden_size
    flat_a = jax.tree_util.tree_leaves_with_path(params)
    flat_b = dict(jax.tree_util.tree_leaves_with_path(loaded))
    assert len(flat_a) == len(flat_b)
    for path, leaf in flat_a:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_b[path]))
