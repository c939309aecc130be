"""The decoders on a 4-device CPU mesh (data x tensor sharding, as `rec eval`/`rec grpo` place
them) give the same results as on one device. Runs in a subprocess: the fake device count must be
set before JAX initialises."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import numpy as np, jax, jax.numpy as jnp
    from rec import dist
    from rec.model import qwen2
    from rec.decode.trie import build_trie
    from rec.decode.beam import constrained_beam_search
    from rec.decode.sampling import generate

    shape = qwen2.shape_with_vocab(qwen2.SHAPES["tiny"], 100)
    params = qwen2.init_params(shape, jax.random.PRNGKey(0), jnp.float32, vocab_multiple=64)
    rng = np.random.default_rng(0)
    sids = sorted({(int(rng.integers(40, 46)), int(rng.integers(50, 62)), int(rng.integers(62, 72)))
                   for _ in range(50)})
    trie = build_trie(sids, 1, 2)
    lengths = [5, 9, 7, 3]
    ids = np.full((4, 9), 2, np.int32)
    mask = np.zeros((4, 9), np.int32)
    for i, n in enumerate(lengths):
        ids[i, 9 - n:] = rng.integers(80, 100, size=n)
        mask[i, 9 - n:] = 1

    def run(p, i, m):
        sid_ids, scores = constrained_beam_search(p, shape, i, m, trie, 8, compute_dtype=jnp.float32,
                                                  decode_attention="plain")
        gen = generate(p, shape, i, m, jax.random.PRNGKey(1), temperature=1.0, top_p=0.9, max_new_tokens=6,
                       eos_id=1, pad_id=0, compute_dtype=jnp.float32, fast_attention=False)
        return [np.asarray(sid_ids), np.asarray(scores)] + [np.asarray(x) for x in gen]

    single = run(params, ids, mask)
    mesh = dist.make_mesh("2,1,2")
    sharded = run(dist.shard_params(params, mesh, qwen2.PARTITION_RULES), *dist.shard_batch((ids, mask), mesh))
    print(json.dumps({
        "devices": jax.device_count(),
        "sids_equal": bool(np.array_equal(single[0], sharded[0])),
        "score_diff": float(np.abs(single[1] - sharded[1]).max()),
        "generate_equal": all(bool(np.array_equal(a, b)) for a, b in zip(single[2:], sharded[2:])),
    }))
    """
)


@pytest.mark.slow
def test_sharded_mesh_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["devices"] == 4
    assert result["sids_equal"] and result["generate_equal"]
    assert result["score_diff"] < 1e-4
