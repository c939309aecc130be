"""SFT end to end on the synthetic dataset: resume after a crash is exact; early stopping; errors."""

import json
import os

import jax
import numpy as np
import pytest

from rec import checkpoint
from rec.config import load_config
from rec.errors import RecError
from rec.train import sft
from rec.train.logging import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cfg(run_dir, dataset, tokenizer, *extra):
    return load_config(
        os.path.join(ROOT, "configs", "tiny", "sft.yaml"),
        [
            f"run.dir={run_dir}",
            f"data.dir={dataset}",
            f"model.tokenizer={tokenizer}",
            "run.progress=false",
            "run.wandb_mode=disabled",
            "data.limit=40",
            "data.max_len=128",
            "data.length_buckets=[128]",
            "train.batch_size=8",
            "train.micro_batch_size=4",
            "train.steps=6",
            "train.eval_every=2",
            "train.eval_limit=8",
            "train.warmup_steps=2",
            *extra,
        ],
    )


def _state_leaves(run_dir):
    step = checkpoint.latest_step(run_dir, "sft_last")
    directory = os.path.join(run_dir, "checkpoints", "sft_last", str(step))
    import orbax.checkpoint as ocp

    with ocp.CheckpointManager(directory.rsplit(os.sep, 1)[0]) as manager:
        restored = manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(), rest=ocp.args.StandardRestore())
        )
    return step, jax.tree.map(np.asarray, {"params": restored["params"], "rest": restored["rest"]})


@pytest.mark.slow
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    straight = str(tmp_path / "straight")
    summary = sft.run_sft(_cfg(straight, synth_dataset_dir, synth_tokenizer_dir))
    assert summary["train/steps"] == 6 and not summary["train/early_stopped"]

    crashed = str(tmp_path / "crashed")
    with pytest.raises(sft._SimulatedCrash):
        sft._train(_cfg(crashed, synth_dataset_dir, synth_tokenizer_dir), crash_after=3)  # last save: step 2
    assert checkpoint.latest_step(crashed, "sft_last") == 2
    sft.run_sft(_cfg(crashed, synth_dataset_dir, synth_tokenizer_dir))  # same command again

    step_a, a = _state_leaves(straight)
    step_b, b = _state_leaves(crashed)
    assert step_a == step_b == 6
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(x, y)  # params, Adam moments, step, rng, data position: bit for bit
    assert int(b["rest"]["data_position"]) == 6

    # metrics.jsonl reads like one run: each step once, same losses
    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(run, "sft") if "loss" in r]

    assert losses(crashed) == losses(straight)
    assert [s for s, _ in losses(crashed)] == [1, 2, 3, 4, 5, 6]
    meta_a = checkpoint.read_meta(straight, "sft_last")
    meta_b = checkpoint.read_meta(crashed, "sft_last")
    assert meta_a["data_position"] == meta_b["data_position"]
    assert meta_a["early_stopping"] == meta_b["early_stopping"]
    assert meta_a["rng"] == meta_b["rng"]
    assert meta_a["model_config"]["model_type"] == "qwen2"

    # run directory contents
    summary_file = json.loads((tmp_path / "crashed" / "run_summary.json").read_text())
    assert summary_file["train/steps"] == 6 and summary_file["train/best_val_loss"] > 0
    assert (tmp_path / "crashed" / "tokenizer" / "tokenizer.json").exists()
    assert (tmp_path / "crashed" / "config.yaml").exists()
    assert checkpoint.latest_step(crashed, "sft_best") is not None
    # SFT learns: validation loss improves on the first validation
    vals = [r["val_loss"] for r in read_metrics(straight, "sft") if "val_loss" in r]
    assert len(vals) == 3 and min(vals[1:]) < vals[0]


@pytest.mark.slow
def test_dropout_is_the_same_however_the_batch_is_split(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    """train.dropout: the masks come from (seed, step, row position in the global batch), so one
    pass of 8 rows and two micro-batches of 4 train the same; without dropout the losses differ."""
    def losses(name, *extra):
        run = str(tmp_path / name)
        sft.run_sft(_cfg(run, synth_dataset_dir, synth_tokenizer_dir, "train.steps=4", *extra))
        return np.array([r["loss"] for r in read_metrics(run, "sft") if "loss" in r])

    split = losses("split", "train.dropout=0.3")
    whole = losses("whole", "train.dropout=0.3", "train.micro_batch_size=8")
    plain = losses("plain", "train.micro_batch_size=8")
    np.testing.assert_allclose(split, whole, rtol=1e-5)
    assert np.abs(split - plain).max() > 1e-3
    with pytest.raises(RecError, match="train.dropout"):
        _cfg(str(tmp_path / "bad"), synth_dataset_dir, synth_tokenizer_dir, "train.dropout=1.0")


@pytest.mark.slow
def test_sft_best_by_ranking_metric_equals_rec_eval(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    """train.best_metric=ndcg@5: each validation decodes the validation rows with constrained
    beams; sft_best is the step with the highest value, and `rec eval` of sft_best on the same
    rows reports that same value."""
    from rec.eval.evaluate import run_eval

    run = str(tmp_path / "ranked")
    extra = ["train.best_metric=ndcg@5", "train.eval_beams=5", "eval.prompt=sft", "eval.batch_size=4"]
    summary = sft.run_sft(_cfg(run, synth_dataset_dir, synth_tokenizer_dir, *extra))
    vals = [r for r in read_metrics(run, "sft") if "val/ndcg@5" in r]
    assert [r["step"] for r in vals] == [2, 4, 6] and all("val/hr@5" in r and "val_loss" in r for r in vals)
    best = max(vals, key=lambda r: (r["val/ndcg@5"], -r["step"]))  # first of equal values
    assert checkpoint.latest_step(run, "sft_best") == best["step"] == summary["train/best_step"]
    assert summary["train/best_val/ndcg@5"] == best["val/ndcg@5"]
    eval_cfg = load_config(os.path.join(ROOT, "configs", "tiny", "eval.yaml"), [
        f"run.dir={tmp_path / 'eval'}", f"data.dir={synth_dataset_dir}", f"model.tokenizer={synth_tokenizer_dir}",
        f"model.path={run}", "model.checkpoint=sft_best", "data.split=valid", "eval.limit=8", "eval.beams=5",
        "eval.prompt=sft", "eval.batch_size=4", "run.progress=false"])
    assert run_eval(eval_cfg)["eval/ndcg@5"] == pytest.approx(best["val/ndcg@5"], abs=1e-9)
    # the selection criterion cannot change under a resumed run, nor ask for more than its beams
    with pytest.raises(RecError, match="train.best_metric"):
        sft.run_sft(_cfg(run, synth_dataset_dir, synth_tokenizer_dir, *extra[1:], "train.steps=8"))
    with pytest.raises(RecError, match="train.eval_beams"):
        sft.run_sft(_cfg(str(tmp_path / "x"), synth_dataset_dir, synth_tokenizer_dir, "train.best_metric=hr@10",
                         "train.eval_beams=5"))


@pytest.mark.slow
def test_early_stopping_and_finished_run_is_not_retrained(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    run = str(tmp_path / "run")
    # lr 0: the validation loss never improves after the first validation
    cfg = _cfg(
        run,
        synth_dataset_dir,
        synth_tokenizer_dir,
        "train.lr=0",
        "train.early_stopping_patience=1",
        "train.steps=8",
    )
    summary = sft.run_sft(cfg)
    assert summary["train/early_stopped"] and summary["train/steps"] == 4
    assert summary["train/best_step"] == 2
    assert checkpoint.latest_step(run, "sft_best") == 2
    again = sft.run_sft(cfg)  # restarting a finished run trains nothing more
    assert again["train/steps"] == 4
    assert [r["step"] for r in read_metrics(run, "sft") if "loss" in r] == [1, 2, 3, 4]


def test_config_errors(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    with pytest.raises(RecError, match="data.dir"):
        sft.run_sft(_cfg(str(tmp_path / "r"), "", synth_tokenizer_dir))
    cfg = _cfg(str(tmp_path / "r"), synth_dataset_dir, synth_tokenizer_dir, "train.steps=0", "train.epochs=0")
    with pytest.raises(RecError, match="train.steps"):
        sft.total_steps_for(cfg.train, 10)
    assert (
        sft.total_steps_for(_cfg(str(tmp_path / "r"), "", "", "train.steps=0", "train.epochs=2.5").train, 10)
        == 25
    )
    assert sft.eval_interval(cfg.train, 1000) == 2
    cfg.train.eval_every = 0
    assert sft.eval_interval(cfg.train, 1000) == 50  # 5% of the run, as upstream
    # a run directory that already holds an SFT run is never restarted from scratch silently
    run = str(tmp_path / "used")
    checkpoint.save(run, "sft_last", {"params": {"w": np.zeros(2, np.float32)}}, 3, {})
    with pytest.raises(RecError, match=r"already holds SFT checkpoints \(checkpoints/sft_last\)"):
        sft.run_sft(_cfg(run, synth_dataset_dir, synth_tokenizer_dir, "run.resume=false"))


@pytest.mark.slow
def test_sft_on_real_industrial_rows(tmp_path, industrial_dir):
    """Real MiniOneRec data (the valid split stands in for the absent train.csv): the mixture
    builds, trains and validates; SID tokens come from the real index."""
    from rec.tokenizer import build_tokenizer

    tok = build_tokenizer(str(industrial_dir), str(tmp_path / "tok"), vocab_size=600)
    run = str(tmp_path / "run")
    cfg = _cfg(
        run,
        str(industrial_dir),
        tok,
        "data.train_split=valid",
        "data.limit=16",
        "train.steps=2",
        "data.max_len=256",
        "data.length_buckets=[128,256]",
    )
    summary = sft.run_sft(cfg)
    assert summary["train/steps"] == 2 and summary["train/best_val_loss"] > 0
    meta = checkpoint.read_meta(run, "sft_last")
    # 560 SID tokens of Industrial (reference §1.4) are in the vocabulary
    from rec.tokenizer import load_tokenizer

    vocab = load_tokenizer(os.path.join(run, "tokenizer")).get_vocab()
    assert sum(1 for t in vocab if t.startswith(("<a_", "<b_", "<c_"))) == 560
    assert meta["model_config"]["vocab_size"] == len(vocab)
