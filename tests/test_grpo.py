"""GSM8K GRPO: fast-path resolution, config errors, and end-to-end runs on CPU."""

import json
import pathlib

import numpy as np
import pytest
import yaml

from rec.config import load_config
from rec.errors import RecError
from rec.train import grpo as G

ROOT = pathlib.Path(__file__).resolve().parent.parent
TINY_GRPO = str(ROOT / "configs" / "tiny" / "grpo.yaml")
ENV_VARS = (G.FAST_GENERATE_ENV, G.FAST_ATTENTION_ENV)


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    "env, setting, expected",
    [
        ({}, "auto", True),  # on by default
        ({}, "on", True),
        ({}, "off", False),
        ({"ROLLOUT_FAST_GENERATE": "0", "ROLLOUT_FAST_QWEN2_DECODE_ATTENTION": "0"}, "auto", False),
        ({"ROLLOUT_FAST_GENERATE": "1", "ROLLOUT_FAST_QWEN2_DECODE_ATTENTION": "1"}, "off", True),  # env wins
    ],
)
def test_fast_path_resolution(clean_env, env, setting, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    cfg = load_config(TINY_GRPO, [f"grpo.fast_generate={setting}", f"grpo.fast_decode_attention={setting}"])
    assert G.resolve_fast_paths(cfg) == {
        "rollout_fast_generate": expected, "rollout_fast_qwen2_decode_attention": expected,
    }


def test_fast_paths_resolve_independently(clean_env):
    clean_env.setenv(G.FAST_ATTENTION_ENV, "0")
    cfg = load_config(TINY_GRPO, [])
    assert G.resolve_fast_paths(cfg) == {"rollout_fast_generate": True, "rollout_fast_qwen2_decode_attention": False}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["grpo.generations=1"], "grpo.generations"),
        (["grpo.reward_weights=[1.0]"], "grpo.reward_weights"),
        (["grpo.synthetic=0", "data.dir="], "data.dir"),
        (["grpo.updates_per_batch=0"], "grpo.updates_per_batch"),
        (["grpo.temperature=-1"], "grpo.temperature"),
        (["train.dropout=0.1"], "train.dropout"),
        (["train.steps=3", "grpo.updates_per_batch=2"],
         r"'train.steps' \(3\) must be a multiple of 'grpo.updates_per_batch' \(2\)"),
    ],
)
def test_bad_grpo_config_is_one_line_error(overrides, message):
    with pytest.raises(RecError, match=message):
        G.run_grpo(load_config(TINY_GRPO, overrides))


def test_missing_gsm8k_split_names_the_file(tmp_path):
    cfg = load_config(TINY_GRPO, ["grpo.synthetic=0", f"data.dir={tmp_path}"])
    with pytest.raises(RecError, match=r"train\.jsonl"):
        G.load_problems(cfg)


def test_prompt_width_and_decode_completions(synth_tokenizer_dir):
    assert G.prompt_width([10, 33], 256) == 48
    assert G.prompt_width([10, 300], 256) == 256
    from rec.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(synth_tokenizer_dir)
    ids = encode(tok, "so 2 + 3 = 5\n#### 5")
    row = np.array([ids + [tok.eos_token_id, 0, 0]])
    mask = np.array([[1] * (len(ids) + 1) + [0, 0]])
    assert G.decode_completions(tok, row, mask) == ["so 2 + 3 = 5\n#### 5"]


def test_synthetic_prompt_uses_plain_format_without_chat_template(synth_tokenizer_dir):
    from rec.data.gsm8k import format_prompt
    from rec.tokenizer import load_tokenizer

    tok = load_tokenizer(synth_tokenizer_dir)
    assert not getattr(tok, "chat_template", None)
    text = format_prompt(tok, "What is 2 + 3?")
    assert text.endswith("Question: What is 2 + 3?\nAnswer:") and "####" in text


def _recording_generate(monkeypatch):
    """Wrap sampling.generate to record which paths each rollout used."""
    from rec.decode import sampling

    calls = []
    real = sampling.generate

    def recording(*args, **kwargs):
        calls.append((kwargs["fast_generate"], kwargs["fast_attention"], kwargs["greedy"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(sampling, "generate", recording)
    return calls


@pytest.mark.slow
def test_grpo_runs_end_to_end_with_fast_paths_on_by_default(tmp_path, synth_tokenizer_dir, clean_env, capsys):
    calls = _recording_generate(clean_env)
    run_dir = tmp_path / "run"
    figures = G.run_grpo(load_config(TINY_GRPO, [f"model.tokenizer={synth_tokenizer_dir}", f"run.dir={run_dir}",
                                                 "run.progress=false", "train.steps=2", "grpo.beta=0.01",
                                                 "grpo.max_new_tokens=8", "grpo.max_prompt_len=64"]))
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]
    assert resolved["rollout_fast_generate"] is True and resolved["rollout_fast_qwen2_decode_attention"] is True
    assert "ROLLOUT_FAST_GENERATE=on, ROLLOUT_FAST_QWEN2_DECODE_ATTENTION=on" in capsys.readouterr().err
    assert calls and all(c[:2] == (True, True) for c in calls)
    assert any(c[2] for c in calls) and any(not c[2] for c in calls)  # sampled rollouts and greedy eval
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("reward", "rewards/correctness_mean", "rewards/format_mean", "completion_length", "loss", "kl",
                "rollout_s", "update_s", "rollout_tokens_per_s"):
        assert key in records[0], key
    summary = json.loads((run_dir / "run_summary.json").read_text())
    assert summary["eval/num_samples"] == 8 and 0.0 <= summary["eval/gsm8k_accuracy"] <= 1.0
    assert figures["train/grpo_steps"] == 2
    from rec import checkpoint

    assert checkpoint.latest_step(str(run_dir), "grpo_last") == 2


@pytest.mark.slow
def test_grpo_env_zero_turns_fast_paths_off_and_run_uses_it(tmp_path, synth_tokenizer_dir, clean_env):
    clean_env.setenv(G.FAST_GENERATE_ENV, "0")
    clean_env.setenv(G.FAST_ATTENTION_ENV, "0")
    calls = _recording_generate(clean_env)
    run_dir = tmp_path / "run"
    G.run_grpo(load_config(TINY_GRPO, [f"model.tokenizer={synth_tokenizer_dir}", f"run.dir={run_dir}",
                                       "run.progress=false", "train.steps=1", "grpo.eval_limit=0",
                                       "grpo.max_new_tokens=4", "grpo.max_prompt_len=64", "grpo.estimator=rloo"]))
    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]
    assert resolved["rollout_fast_generate"] is False and resolved["rollout_fast_qwen2_decode_attention"] is False
    assert calls and all(c[:2] == (False, False) for c in calls)


@pytest.mark.slow
def test_grpo_on_real_gsm8k(tmp_path, synth_tokenizer_dir, gsm8k_dir, clean_env):
    run_dir = tmp_path / "run"
    figures = G.run_grpo(load_config(TINY_GRPO, [
        f"model.tokenizer={synth_tokenizer_dir}", f"run.dir={run_dir}", "run.progress=false", "grpo.synthetic=0",
        f"data.dir={gsm8k_dir}", "data.limit=8", "train.steps=1", "grpo.eval_limit=4", "eval.batch_size=4",
        "grpo.max_new_tokens=4", "grpo.max_prompt_len=64",
    ]))
    assert figures["eval/num_samples"] == 4
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["resolved"]["num_problems"] == 8


@pytest.mark.slow
def test_grpo_resume_ends_in_the_same_state(tmp_path, synth_tokenizer_dir, clean_env):
    """2 steps in one go vs a run killed right after its grpo_last@1 checkpoint and restarted:
    the sampling RNG lives in the checkpointed state, so rollouts and parameters match.
    A random tiny model never answers correctly, so the reward is replaced by one that varies
    with the sampled text (its length mod 5): advantages and updates are then non-zero."""
    import jax

    from rec import checkpoint

    def text_length_reward(completions, golds, weights):
        total = np.array([len(c) % 5 for c in completions], np.float32)
        return total, {"correctness": total, "format": np.zeros_like(total)}

    clean_env.setattr(G, "gsm8k_rewards", text_length_reward)

    def cfg(run_dir):
        return load_config(TINY_GRPO, [f"model.tokenizer={synth_tokenizer_dir}", f"run.dir={run_dir}",
                                       "run.progress=false", "train.steps=2", "checkpoint.every_steps=1",
                                       "grpo.eval_limit=0", "grpo.max_new_tokens=6", "grpo.max_prompt_len=64",
                                       "train.lr=0.01"])

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    G.run_grpo(cfg(straight))

    class Killed(Exception):
        pass

    real_save = checkpoint.Checkpointer.save

    def save_then_die(self, tag, state, step, meta=None, keep=1):
        path = real_save(self, tag, state, step, meta, keep)
        if step == 1:
            raise Killed()
        return path

    clean_env.setattr(checkpoint.Checkpointer, "save", save_then_die)
    with pytest.raises(Killed):
        G.run_grpo(cfg(resumed))
    clean_env.setattr(checkpoint.Checkpointer, "save", real_save)
    G.run_grpo(cfg(resumed))
    a = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [1, 2]
    assert a[0]["grad_norm"] > 0 and a[1]["grad_norm"] > 0
    assert b[1]["completion_length"] == a[1]["completion_length"] and b[1]["loss"] == pytest.approx(a[1]["loss"])
    _, pa = checkpoint.load_params(str(straight), "grpo_last")
    _, pb = checkpoint.load_params(str(resumed), "grpo_last")
    jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-6), pa, pb)
    # the same directory as a fresh run: refused (Orbax would keep the old steps and save nothing)
    fresh = cfg(resumed)
    fresh.run.resume = False
    with pytest.raises(RecError, match=r"already holds GRPO checkpoints \(checkpoints/grpo_last\)"):
        G.run_grpo(fresh)


def test_prompt_uses_chat_template_when_the_tokenizer_has_one(synth_tokenizer_dir):
    from rec.data.gsm8k import FORMAT_INSTRUCTION, format_prompt
    from rec.tokenizer import load_tokenizer

    tok = load_tokenizer(synth_tokenizer_dir)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    text = format_prompt(tok, "What is 2 + 3?")
    assert text == (f"<|im_start|>system\n{FORMAT_INSTRUCTION}<|im_end|>\n"
                    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n")
