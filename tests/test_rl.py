"""Recommendation RL: helpers, config errors, and short end-to-end runs on the synthetic data."""

import csv
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rec.config import load_config
from rec.errors import RecError
from rec.train import rl as RL

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_RL = str(ROOT / "configs" / "tiny" / "rl.yaml")


# --------------------------------------------------------------------------------------------
# Pure helpers


def test_step_prompt_indices_cover_each_epoch_once_and_are_deterministic():
    n, per_step = 10, 4
    order = np.concatenate([RL.step_prompt_indices(i, per_step, n, seed=7) for i in range(5)])  # 20 = 2 epochs
    assert sorted(order[:10].tolist()) == list(range(10))
    assert sorted(order[10:].tolist()) == list(range(10))
    assert not np.array_equal(order[:10], order[10:])  # reshuffled per epoch
    # batch 2 straddles epochs 0 and 1: positions 8..11
    np.testing.assert_array_equal(RL.step_prompt_indices(2, per_step, n, seed=7), order[8:12])
    np.testing.assert_array_equal(RL.step_prompt_indices(3, per_step, n, seed=7), order[12:16])
    assert not np.array_equal(RL.step_prompt_indices(0, per_step, n, seed=8), order[:4])


def test_bucket_length_and_left_pad():
    assert RL.bucket_length(5, [8, 16]) == 8
    assert RL.bucket_length(9, [8, 16]) == 16
    assert RL.bucket_length(40, [8, 16]) == 16  # too long: truncated to the largest bucket
    ids, mask = RL.left_pad_prompts([[1, 2, 3], [4, 5, 6, 7, 8, 9]], 4, pad_id=0)
    np.testing.assert_array_equal(ids, [[0, 1, 2, 3], [6, 7, 8, 9]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [1, 1, 1, 1]])


def test_completion_tokens_append_newline_eos_and_pad_short_sids():
    sids = np.array([[[5, 6, 7, 8], [5, 6, 9, -1]]])  # one prompt, 2 beams; the second SID has 3 tokens
    ids, mask = RL.completion_tokens(sids, newline_id=1, eos_id=2, pad_id=0)
    np.testing.assert_array_equal(ids, [[5, 6, 7, 8, 1, 2], [5, 6, 9, 1, 2, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0]])


def test_reward_metrics_and_diversity_by_hand():
    hits = np.array([[False, True], [False, False]])
    total = np.array([[0.0, 1.0], [0.0, 0.0]], np.float32)
    m = RL.reward_metrics(total, {"rule": total}, hits)
    assert m["reward"] == 0.25
    assert m["reward_std"] == pytest.approx(np.std([0, 1], ddof=1) / 2)  # mean of per-group std
    assert m["hit_rate"] == 0.5 and m["hit@1"] == 0.0
    assert m["rewards/rule_mean"] == 0.25
    assert RL.categorical_diversity([["a", "b", "a", "c"], ["x", "x", "x", "x"]]) == pytest.approx((0.75 + 0.25) / 2)


def test_mix_reference_and_unsplit():
    ref = {"w": jnp.array([1.0, 2.0])}
    pol = {"w": jnp.array([3.0, 6.0])}
    np.testing.assert_allclose(RL.mix_reference(ref, pol, 0.6)["w"], [0.4 * 1 + 0.6 * 3, 0.4 * 2 + 0.6 * 6])
    from rec.train.step import split_micro_batches

    x = jnp.arange(24).reshape(12, 2)
    np.testing.assert_array_equal(RL.unsplit_micro_batches(split_micro_batches({"x": x}, 3)["x"]), x)


@pytest.mark.parametrize(
    "override, message",
    [
        ("rl.generations=1", "rl.generations"),
        ("rl.updates_per_batch=0", "rl.updates_per_batch"),
        ("rl.best_metric=recall@3", "rl.best_metric"),
        ("rl.best_metric=hr@50", "rl.best_metric"),
        ("rl.clip_eps=1.5", "rl.clip_eps"),
        ("data.dir=", "data.dir"),
        ("train.dropout=0.1", "train.dropout"),
        ("rl.reward_weights=[1,2,3,4,5]", r"'rl.reward_weights' has 5 value\(s\) but the reward has 2 term\(s\)"),
        ("train.steps=5 rl.updates_per_batch=2",
         r"'train.steps' \(5\) must be a multiple of 'rl.updates_per_batch' \(2\)"),
    ],
)
def test_bad_rl_config_is_one_line_error(override, message, tmp_path):
    cfg = load_config(TINY_RL, ["data.dir=/nonexistent", f"run.dir={tmp_path}/run", *override.split()])
    with pytest.raises(RecError, match=message):
        RL.run_rl(cfg)
    assert not (tmp_path / "run").exists()  # found before anything is written


def test_cli_bad_rl_value_exit_2(tmp_path, capsys):
    from rec.cli import main

    assert main(["rl", "--config", TINY_RL, "rl.reward=semantic"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "rl.reward" in err[0]


def test_unknown_sid_in_train_split_names_file_and_line(tmp_path, synth_tokenizer_dir, capsys):
    from rec.cli import main
    from tests.fixtures_data import make_synth_dataset

    directory = pathlib.Path(make_synth_dataset(tmp_path / "ds", users=20, items=16))
    lines = (directory / "train.csv").read_text().split("\n")
    lines[3] = lines[3].rsplit(",", 1)[0] + ",<a_99><b_9><c_9>"
    (directory / "train.csv").write_text("\n".join(lines))
    run_dir = tmp_path / "run"
    code = main(["rl", "--config", TINY_RL, f"data.dir={directory}", f"model.tokenizer={synth_tokenizer_dir}",
                 f"run.dir={run_dir}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {directory / 'train.csv'}:4: unknown SID <a_99><b_9><c_9>")
    assert not run_dir.exists()  # nothing written


# --------------------------------------------------------------------------------------------
# End to end


def _single_target_dataset(tmp_path) -> str:
    """The synthetic dataset with every train row's next item set to one item: a policy that
    learns to rank that SID first earns the most reward, so RL must raise the reward quickly."""
    from tests.fixtures_data import make_synth_dataset

    directory = pathlib.Path(make_synth_dataset(tmp_path / "ds", users=40, items=24))
    info = (directory / "info.txt").read_text().splitlines()[0].split("\t")
    sid, title, item_id = info[0], info[1], info[2]
    path = directory / "train.csv"
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for row in rows:
        row.update(item_title=title, item_id=item_id, item_sid=sid)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(directory)


def _tiny_overrides(data_dir, tokenizer_dir, run_dir, steps):
    return [
        f"data.dir={data_dir}", f"model.tokenizer={tokenizer_dir}", f"run.dir={run_dir}",
        f"train.steps={steps}", "train.batch_size=8", "train.micro_batch_size=4", "train.lr=0.01",
        "train.warmup_ratio=0", "rl.generations=4", "rl.tasks=[sid_next]", "rl.eval_every=6",
        "rl.eval_limit=8", "rl.eval_beams=4", "eval.batch_size=8", "eval.topk=[1,4]", "rl.best_metric=hr@4",
        "rl.ref_sync_every=3", "data.length_buckets=[96]", "data.max_len=96", "run.progress=false",
    ]


@pytest.mark.slow
def test_rl_run_raises_reward_and_writes_checkpoints(tmp_path, synth_tokenizer_dir, monkeypatch):
    from rec import checkpoint

    monkeypatch.delenv("ROLLOUT_FAST_QWEN2_DECODE_ATTENTION", raising=False)

    data_dir = _single_target_dataset(tmp_path)
    run_dir = tmp_path / "run"
    summary = RL.run_rl(load_config(TINY_RL, _tiny_overrides(data_dir, synth_tokenizer_dir, run_dir, 12)))

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 13))
    for key in ("reward", "reward_std", "rewards/rule_mean", "rewards/ranking_only_mean", "hit_rate", "kl", "lr",
                "categorical_diversity", "rollout_s", "update_s", "loss", "grad_norm"):
        assert key in records[0], key
    assert "val/hr@4" in records[5] and "val/ndcg@4" in records[5] and "val/hr@4" not in records[4]
    # The best a group can earn on average: the target at rank 0 gets 1, the others -w_1..-w_3,
    # i.e. a mean of w_0 / G. A random start is far below it; RL must get close.
    from rec.train.rewards import rank_weights

    best = rank_weights(4)[0] / 4
    rewards = [r["reward"] for r in records]
    assert rewards[0] < 0.5 * best and np.mean(rewards[-4:]) > 0.9 * best, rewards
    assert records[-1]["hit@1"] > records[0]["hit@1"]
    assert all(r["categorical_diversity"] == 1.0 for r in records)  # beams are distinct SIDs
    assert records[-1]["kl"] > 0.0  # the policy moved away from the reference
    assert checkpoint.latest_step(str(run_dir), "rl_last") == 12
    assert checkpoint.latest_step(str(run_dir), "rl_best") is not None
    assert summary["train/rl_steps"] == 12
    stored = json.loads((run_dir / "run_summary.json").read_text())
    assert stored["train/rl_val_hr@4"] == summary["train/rl_val_hr@4"]
    import yaml

    assert yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]["rollout_fast_qwen2_decode_attention"]


@pytest.mark.slow
def test_rl_resume_ends_in_the_same_state(tmp_path, synth_tokenizer_dir, monkeypatch):
    """4 steps in one go vs a run preempted (SIGTERM) after step 2 and restarted with the same
    command (reference sync every 3 steps, so the restored reference matters too). The periodic
    save is every 4 steps, so rl_last@2 can only come from the preemption save. Two PPO updates
    per rollout batch, so the clipped-ratio path runs as well."""
    import os
    import signal

    from rec import checkpoint
    from rec.dist.preemption import Preempted

    data_dir = _single_target_dataset(tmp_path)
    extra = ["rl.eval_limit=0", "rl.best_metric=", "checkpoint.every_steps=4", "train.lr=0.003", "rl.updates_per_batch=2"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    RL.run_rl(load_config(TINY_RL, _tiny_overrides(data_dir, synth_tokenizer_dir, straight, 4) + extra))

    real_step = RL.rl_step

    def step_then_sigterm(*args, **kwargs):
        out = real_step(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)  # arrives during the step, as a preemption notice would
        return out

    cfg = load_config(TINY_RL, _tiny_overrides(data_dir, synth_tokenizer_dir, resumed, 4) + extra)
    monkeypatch.setattr(RL, "rl_step", step_then_sigterm)
    handler_before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Preempted, match="at step 2"):
        RL.run_rl(cfg)
    monkeypatch.setattr(RL, "rl_step", real_step)
    assert signal.getsignal(signal.SIGTERM) == handler_before  # our handler removed again
    assert checkpoint.latest_step(str(resumed), "rl_last") == 2
    RL.run_rl(cfg)
    assert checkpoint.latest_step(str(resumed), "rl_last") == 4
    # the same directory as a fresh run: refused (Orbax would keep the old steps and save nothing)
    fresh = load_config(TINY_RL, _tiny_overrides(data_dir, synth_tokenizer_dir, resumed, 4) + extra + ["run.resume=false"])
    with pytest.raises(RecError, match=r"already holds RL checkpoints \(checkpoints/rl_last\)"):
        RL.run_rl(fresh)
    _, a = checkpoint.load_params(str(straight), "rl_last")
    _, b = checkpoint.load_params(str(resumed), "rl_last")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6), a, b)
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    first = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in first] == [2, 4]  # one record per rollout batch (2 updates each)
    assert records[-1]["reward"] == pytest.approx(first[-1]["reward"])
    assert first[-1]["clip_fraction"] >= 0.0 and first[-1]["grad_norm"] > 0


def test_prompt_set_is_upstreams_whatever_the_run_seed(tmp_path, synth_dataset_dir, synth_tokenizer_dir):
    """seq_title2sid keeps a sample of the rows; upstream draws it with seed 0 however its run is
    seeded, so run.seed (which orders the epochs) must not change which prompts exist."""
    from rec.dist import make_mesh

    def prompts(seed):
        overrides = _tiny_overrides(synth_dataset_dir, synth_tokenizer_dir, tmp_path / f"r{seed}", 2)
        overrides += ["rl.tasks=[seq_title2sid]", "rl.seq_title_sample=5", f"run.seed={seed}"]
        setup, _ = RL._prepare(load_config(TINY_RL, overrides), make_mesh("auto"))
        return setup.prompt_ids

    first = prompts(1)
    assert len(first) == 5 and prompts(2) == first
