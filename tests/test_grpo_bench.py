"""`rec bench rollout`: one JSON object with tokens/s and the fast-path settings used."""

import json

import pytest

from rec.cli import build_parser


def _args(*extra):
    return build_parser().parse_args(["bench", "rollout", "--shape", "tiny", "--batch", "2", "--prompt-len", "8",
                                      "--gen-len", "4", "--iters", "1", "--dtype", "float32", *extra])


@pytest.mark.slow
def test_bench_rollout_prints_one_json_object(capsys, monkeypatch):
    fast = "off"  # the explicit flag wins over the environment (the GRPO tests cover both paths)
    from rec.bench import run_bench

    monkeypatch.setenv("ROLLOUT_FAST_GENERATE", "1")
    monkeypatch.setenv("ROLLOUT_FAST_QWEN2_DECODE_ATTENTION", "1")
    result = run_bench(_args("--fast", fast))
    assert json.loads(capsys.readouterr().out.strip()) == result
    assert result["fast_generate"] is (fast == "on") and result["fast_decode_attention"] is (fast == "on")
    assert result["generated_tokens_per_call"] == 2 * 4  # random weights never sample EOS
    assert result["tokens_per_s"] > 0


def test_bench_rollout_auto_follows_environment(monkeypatch):
    from rec.decode.sampling import rollout_fast_paths

    monkeypatch.setenv("ROLLOUT_FAST_GENERATE", "0")
    monkeypatch.delenv("ROLLOUT_FAST_QWEN2_DECODE_ATTENTION", raising=False)
    assert rollout_fast_paths("auto", "auto") == (False, True)
