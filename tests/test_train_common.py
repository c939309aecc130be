"""Model/tokenizer resolution: random init, HF directory (+ vocabulary growth), run directory."""

import os

import jax
import numpy as np
import pytest

from rec import checkpoint
from rec.config import load_config
from rec.data.dataset import load_catalogue
from rec.errors import RecError
from rec.train.common import load_model_and_tokenizer, prepare_run_dir, resolve_checkpoint_tag


def _cfg(*overrides):
    return load_config(
        None, ["run.progress=false", "model.param_dtype=float32", "model.vocab_multiple=64", *overrides]
    )


def test_random_init_sizes_tiny_to_tokenizer_and_prepare_run_dir(
    tmp_path, synth_dataset_dir, synth_tokenizer_dir
):
    cfg = _cfg(f"model.tokenizer={synth_tokenizer_dir}", f"run.dir={tmp_path / 'run'}")
    shape, params, tok = load_model_and_tokenizer(cfg, load_catalogue(synth_dataset_dir), "sft")
    assert shape.vocab_size == len(tok)
    assert params["embed_tokens"]["embedding"].shape == (-(-len(tok) // 64) * 64, 64)
    prepare_run_dir(cfg, "sft", {"note": 1}, tok)
    run = tmp_path / "run"
    assert "note: 1" in (run / "config.yaml").read_text()
    assert (run / "config.sft.yaml").exists()
    from rec.tokenizer import load_tokenizer

    assert len(load_tokenizer(str(run / "tokenizer"))) == len(tok)


def test_hf_dir_grows_vocabulary_to_tokenizer(tiny_hf_dir_factory, synth_dataset_dir, synth_tokenizer_dir):
    hf = tiny_hf_dir_factory(vocab_size=300, tied=False, tokenizer_dir=synth_tokenizer_dir)
    from rec.model.hf_io import load_hf

    _, original = load_hf(str(hf), "float32")
    cfg = _cfg(f"model.path={hf}")
    shape, params, tok = load_model_and_tokenizer(cfg, load_catalogue(synth_dataset_dir), "sft")
    assert len(tok) > 300 and shape.vocab_size == len(tok)
    emb = np.asarray(params["embed_tokens"]["embedding"])
    np.testing.assert_allclose(emb[:300], np.asarray(original["embed_tokens"]["embedding"])[:300])
    # new rows (the SID tokens beyond the checkpoint's vocabulary) start at the mean of the old rows
    np.testing.assert_allclose(
        emb[300 : len(tok)], np.broadcast_to(emb[:300].mean(0), (len(tok) - 300, 64)), rtol=1e-5, atol=1e-6
    )
    head = np.asarray(params["lm_head"]["kernel"])
    np.testing.assert_allclose(head[:, len(tok) - 1], head[:, :300].mean(1), rtol=1e-5, atol=1e-6)


def test_hf_dir_with_spare_rows_keeps_its_vocabulary(
    tiny_hf_dir_factory, synth_dataset_dir, synth_tokenizer_dir
):
    hf = tiny_hf_dir_factory(vocab_size=640, tied=True, tokenizer_dir=synth_tokenizer_dir)
    shape, params, tok = load_model_and_tokenizer(
        _cfg(f"model.path={hf}"), load_catalogue(synth_dataset_dir), "eval"
    )
    assert len(tok) < 640 and shape.vocab_size == 640  # Qwen-style: SID ids reuse spare rows


def test_run_dir_checkpoint_resolution(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    cfg = _cfg(f"model.tokenizer={synth_tokenizer_dir}", f"run.dir={tmp_path / 'run'}")
    catalogue = load_catalogue(synth_dataset_dir)
    shape, params, tok = load_model_and_tokenizer(cfg, catalogue, "sft")
    run = str(tmp_path / "run")
    prepare_run_dir(cfg, "sft", None, tok)
    checkpoint.save(run, "sft_best", {"params": params}, 5, {"model_config": shape.to_hf_config()})
    got_shape, got, got_tok = load_model_and_tokenizer(_cfg(f"model.path={run}"), catalogue, "rl")
    assert got_shape == shape and len(got_tok) == len(tok)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(RecError, match="no checkpoint 'sft_last'.*available: sft_best"):
        resolve_checkpoint_tag(run, "", "sft")
    assert resolve_checkpoint_tag(run, "", "export") == "sft_best"
    with pytest.raises(RecError, match="no checkpoint 'rl_last'"):
        load_model_and_tokenizer(_cfg(f"model.path={run}", "model.checkpoint=rl_last"), catalogue, "eval")


def test_bad_model_sources(tmp_path):
    with pytest.raises(RecError, match="model.path"):
        load_model_and_tokenizer(_cfg(f"model.path={tmp_path / 'nowhere'}"), None, "sft")
    with pytest.raises(RecError, match="model.tokenizer"):
        load_model_and_tokenizer(_cfg(), None, "sft")
    os.makedirs(tmp_path / "empty")
    with pytest.raises(RecError):
        load_model_and_tokenizer(_cfg(f"model.path={tmp_path / 'empty'}"), None, "sft")


def test_crossed_multiple_matches_brute_force():
    """A rollout trainer advances `updates` steps at a time; a multiple of `every` inside those
    steps must still count (step % every == 0 alone misses it)."""
    from rec.train.common import crossed_multiple

    for every in range(0, 7):
        for updates in range(1, 5):
            for step in range(updates, 40):
                expected = every > 0 and any(s % every == 0 for s in range(step - updates + 1, step + 1))
                assert crossed_multiple(step, updates, every) == expected, (step, updates, every)
