"""Parity with transformers' torch Qwen2 and HF safetensors round trips (rec.model.hf_io)."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rec.errors import RecError
from rec.model.hf_io import export_model, load_hf, save_hf
from rec.model.qwen2 import forward, positions_from_mask
from tests.fixtures_model import make_tiny_torch_qwen2

pytest.importorskip("torch")
pytestmark = pytest.mark.torch

VOCAB = 300


def _left_padded_batch(vocab: int, seed: int = 0):
    """Tokens [3,9] with rows of true length 9, 6, 2 (left padded with id 0) and their mask."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(3, 9))
    mask = np.ones((3, 9), bool)
    mask[1, :3] = False
    mask[2, :7] = False
    tokens[~mask] = 0
    return tokens, mask


def _torch_logits(model, tokens, mask):
    torch = pytest.importorskip("torch")
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(tokens),
            attention_mask=torch.tensor(mask.astype(np.int64)),
            position_ids=torch.tensor(positions),
        )
    return out.logits.float().numpy()


def _our_logits(shape, params, tokens, mask):
    mask_j = jnp.asarray(mask)
    logits, _ = forward(
        params, shape, jnp.asarray(tokens), positions_from_mask(mask_j), mask_j, compute_dtype=jnp.float32
    )
    return np.asarray(logits)


@pytest.mark.parametrize(
    "tied,rope_theta", [(True, 1_000_000.0), (False, 1_000_000.0), (True, 500.0), (False, 37.5)]
)
def test_logits_match_torch_left_padded(tmp_path, tied, rope_theta):
    model = make_tiny_torch_qwen2(VOCAB, tied=tied, rope_theta=rope_theta, seed=1)
    model.save_pretrained(tmp_path)
    shape, params = load_hf(str(tmp_path), progress=False)
    assert shape.tie_embeddings == tied and shape.rope_theta == rope_theta
    assert ("lm_head" in params) == (not tied)
    tokens, mask = _left_padded_batch(VOCAB)
    ours = _our_logits(shape, params, tokens, mask)
    ref = _torch_logits(model, tokens, mask)
    assert ours.shape == ref.shape
    assert np.abs(ours[mask] - ref[mask]).max() <= 1e-4
    # A logit spread well above the tolerance, so the comparison is meaningful.
    assert ref[mask].std() > 0.05


def test_padded_vocab_log_softmax_matches_torch(tiny_hf_dir_factory):
    hf_dir = tiny_hf_dir_factory(vocab_size=VOCAB, tied=False)
    from transformers import Qwen2ForCausalLM

    model = Qwen2ForCausalLM.from_pretrained(hf_dir, attn_implementation="eager").float().eval()
    shape, params = load_hf(str(hf_dir), vocab_multiple=128, progress=False)
    assert params["embed_tokens"]["embedding"].shape[0] == 384 and params["lm_head"]["kernel"].shape[1] == 384
    tokens, mask = _left_padded_batch(VOCAB, seed=3)
    ours = _our_logits(shape, params, tokens, mask)
    assert np.isneginf(ours[..., VOCAB:]).all()
    ref = _torch_logits(model, tokens, mask)
    ours_lp = np.asarray(jax.nn.log_softmax(jnp.asarray(ours), axis=-1))[..., :VOCAB]
    ref_lp = np.asarray(jax.nn.log_softmax(jnp.asarray(ref), axis=-1))
    assert np.abs(ours_lp[mask] - ref_lp[mask]).max() <= 1e-4


def test_bf16_checkpoint_loads(tmp_path):
    torch = pytest.importorskip("torch")
    model = make_tiny_torch_qwen2(VOCAB, tied=True, seed=2).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    shape, params = load_hf(str(tmp_path), param_dtype="float32", progress=False)
    expected = model.model.layers[1].self_attn.k_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(params["layers"]["self_attn"]["k_proj"]["kernel"][1]), expected)
    _, params_bf16 = load_hf(str(tmp_path), param_dtype="bfloat16", progress=False)
    assert params_bf16["norm"]["scale"].dtype == jnp.bfloat16


def test_sharded_save_round_trip_and_torch_reads_it(tmp_path, tiny_hf_dir_factory):
    hf_dir = tiny_hf_dir_factory(vocab_size=VOCAB, tied=False)
    shape, params = load_hf(str(hf_dir), vocab_multiple=64, progress=False)
    out = tmp_path / "exported"
    save_hf(str(out), shape, params, dtype="float32", max_shard_bytes=40_000, progress=False)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted(set(index["weight_map"].values()))
    assert len(shard_files) > 2 and all((out / f).exists() for f in shard_files)
    assert not (out / "model.safetensors").exists()
    assert "lm_head.weight" in index["weight_map"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen2" and config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["vocab_size"] == VOCAB  # padding rows dropped

    shape2, params2 = load_hf(str(out), vocab_multiple=64, progress=False)
    assert shape2 == shape
    flat1 = jax.tree_util.tree_leaves_with_path(params)
    flat2 = dict(jax.tree_util.tree_leaves_with_path(params2))
    for path, leaf in flat1:
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat2[path]))

    from transformers import Qwen2ForCausalLM

    reread = Qwen2ForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    tokens, mask = _left_padded_batch(VOCAB, seed=5)
    ours = _our_logits(shape, params, tokens, mask)[..., :VOCAB]
    assert np.abs(ours[mask] - _torch_logits(reread, tokens, mask)[mask]).max() <= 1e-4


def test_tied_save_omits_lm_head_and_reloads(tmp_path, tiny_hf_dir_factory):
    hf_dir = tiny_hf_dir_factory(vocab_size=VOCAB, tied=True)
    shape, params = load_hf(str(hf_dir), progress=False)
    out = tmp_path / "tied"
    save_hf(str(out), shape, params, dtype="bfloat16", progress=False)
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="numpy") as f:
        names = set(f.keys())
        assert f.get_tensor("model.norm.weight").dtype.name == "bfloat16"
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    shape2, params2 = load_hf(str(out), progress=False)
    assert shape2.tie_embeddings and "lm_head" not in params2
    # bf16 storage: within bf16 rounding of the f32 originals.
    a = np.asarray(params["layers"]["mlp"]["down_proj"]["kernel"])
    b = np.asarray(params2["layers"]["mlp"]["down_proj"]["kernel"])
    assert np.abs(a - b).max() <= np.abs(a).max() * 2**-8


def test_missing_lm_head_means_tied(tmp_path, tiny_hf_dir_factory):
    """A config that says untied but has no lm_head.weight loads as tied (like small Qwen2.5)."""
    hf_dir = tiny_hf_dir_factory(vocab_size=VOCAB, tied=True)
    for f in hf_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config["tie_word_embeddings"] = False
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape, params = load_hf(str(tmp_path), progress=False)
    assert shape.tie_embeddings and "lm_head" not in params


def test_transformers5_rope_parameters_layout(tmp_path, tiny_hf_dir_factory):
    hf_dir = tiny_hf_dir_factory(vocab_size=VOCAB, tied=True)
    for f in hf_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "config.json").read_text())
    config.pop("rope_theta", None)
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": 1234.0}
    (tmp_path / "config.json").write_text(json.dumps(config))
    shape, _ = load_hf(str(tmp_path), progress=False)
    assert shape.rope_theta == 1234.0


def _copy_dir(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_load_errors_name_file_and_key(tmp_path, tiny_hf_dir_factory):
    from safetensors.numpy import load_file, save_file

    hf_dir = tiny_hf_dir_factory(vocab_size=VOCAB, tied=True)

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RecError, match=r"config\.json: not found"):
        load_hf(str(empty))

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text((hf_dir / "config.json").read_text())
    with pytest.raises(RecError, match=r"no model\.safetensors"):
        load_hf(str(no_weights))

    missing = _copy_dir(hf_dir, tmp_path / "missing")
    tensors = load_file(str(missing / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(missing / "model.safetensors"))
    with pytest.raises(
        RecError, match=r"model\.safetensors: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"
    ):
        load_hf(str(missing), progress=False)

    bad_shape = _copy_dir(hf_dir, tmp_path / "bad_shape")
    tensors = load_file(str(bad_shape / "model.safetensors"))
    tensors["model.norm.weight"] = np.ones(63, np.float32)
    save_file(tensors, str(bad_shape / "model.safetensors"))
    with pytest.raises(RecError, match=r"model\.safetensors: tensor 'model\.norm\.weight' has shape \[63\]"):
        load_hf(str(bad_shape), progress=False)

    bad_json = _copy_dir(hf_dir, tmp_path / "bad_json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(RecError, match=r"config\.json: invalid JSON"):
        load_hf(str(bad_json))


def test_export_hf_dir_copies_tokenizer(tmp_path, tiny_hf_dir_factory):
    src = _copy_dir(tiny_hf_dir_factory(vocab_size=VOCAB, tied=True), tmp_path / "src")
    (src / "tokenizer.json").write_text('{"fake": true}')
    (src / "tokenizer_config.json").write_text("{}")
    out = tmp_path / "out"
    assert export_model(str(src), str(out), dtype="float32") == str(out)
    assert (out / "tokenizer.json").read_text() == '{"fake": true}'
    assert (out / "tokenizer_config.json").exists()
    shape_a, params_a = load_hf(str(src), progress=False)
    shape_b, params_b = load_hf(str(out), progress=False)
    assert shape_a == shape_b
    np.testing.assert_array_equal(
        np.asarray(params_a["embed_tokens"]["embedding"]), np.asarray(params_b["embed_tokens"]["embedding"])
    )
    with pytest.raises(RecError, match="neither a Hugging Face model directory"):
        export_model(str(tmp_path / "nothing"), str(tmp_path / "o2"))
    # exporting again over an earlier export is fine; into someone else's directory it is refused
    assert export_model(str(src), str(out), dtype="float32") == str(out)
    dataset = tmp_path / "dataset"
    dataset.mkdir()
    (dataset / "test.csv").write_text("user_id,history_item_sid\n")
    with pytest.raises(RecError, match=r"--out .*dataset: not empty and not an earlier model export"):
        export_model(str(src), str(dataset), dtype="float32")
    assert sorted(p.name for p in dataset.iterdir()) == ["test.csv"]


def test_export_run_dir_checkpoint(tmp_path, tiny_hf_dir_factory):
    """A run directory's Orbax checkpoint (padded vocab) -> HF directory that loads back the same weights."""
    from rec import checkpoint

    shape, params = load_hf(
        str(tiny_hf_dir_factory(vocab_size=VOCAB, tied=False)), vocab_multiple=128, progress=False
    )
    run_dir = tmp_path / "run"
    checkpoint.save(
        str(run_dir), "sft_best", {"params": params}, step=7, meta={"model_config": shape.to_hf_config()}
    )
    (run_dir / "tokenizer").mkdir()
    (run_dir / "tokenizer" / "tokenizer.json").write_text('{"run": 1}')
    out = tmp_path / "hf"
    export_model(str(run_dir), str(out), dtype="float32")
    assert (out / "tokenizer.json").read_text() == '{"run": 1}'
    shape2, params2 = load_hf(str(out), vocab_multiple=128, progress=False)
    assert shape2 == shape
    for (path, a), (_, b) in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves_with_path(params2), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(path))


def test_gcs_round_trip_and_stale_shards_removed(gcs_bucket, tiny_hf_dir_factory, tmp_path, monkeypatch):
    """save_hf/load_hf on gs:// (fake-gcs-server); re-exporting unsharded removes the old shards;
    no downloaded copy is left in the temporary directory."""
    import tempfile

    from rec import storage

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))

    shape, params = load_hf(str(tiny_hf_dir_factory(vocab_size=VOCAB, tied=False)), progress=False)
    out = f"gs://{gcs_bucket}/models/tiny"
    save_hf(out, shape, params, dtype="float32", max_shard_bytes=100_000, progress=False)
    names = storage.listdir(out)
    assert "model.safetensors.index.json" in names and "model.safetensors" not in names
    shape2, params2 = load_hf(out, progress=False)
    assert shape2 == shape
    np.testing.assert_array_equal(
        np.asarray(params2["lm_head"]["kernel"]), np.asarray(params["lm_head"]["kernel"])
    )
    save_hf(out, shape, params, dtype="bfloat16", progress=False)
    assert storage.listdir(out) == ["config.json", "model.safetensors"]
    _, params3 = load_hf(out, progress=False)  # bf16 on disk, float32 in memory: bf16-rounded values
    rounded = np.asarray(params["norm"]["scale"]).astype(jnp.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(params3["norm"]["scale"], rounded)
    assert not list(scratch.glob("rec-*"))  # our downloads and staging dirs are gone (torch keeps its own)


def test_bf16_compute_error_comparable_to_hf_bf16(tmp_path):
    """Our bf16 compute path deviates from the f32 reference about as much as HF's bf16 model does."""
    torch = pytest.importorskip("torch")
    model = make_tiny_torch_qwen2(VOCAB, tied=False, seed=4)
    model.save_pretrained(tmp_path)
    shape, params = load_hf(str(tmp_path), progress=False)
    tokens, mask = _left_padded_batch(VOCAB, seed=6)
    reference = _torch_logits(model, tokens, mask)
    hf_bf16 = _torch_logits(model.to(torch.bfloat16), tokens, mask)
    mask_j = jnp.asarray(mask)
    ours, _ = forward(
        params, shape, jnp.asarray(tokens), positions_from_mask(mask_j), mask_j, compute_dtype=jnp.bfloat16
    )
    ours_err = np.abs(np.asarray(ours)[mask] - reference[mask]).max()
    hf_err = np.abs(hf_bf16[mask] - reference[mask]).max()
    assert 0 < ours_err <= 2 * hf_err
