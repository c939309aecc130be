"""`rec bench rl`: one JSON object with steps/s and samples/s (tiny shape, real Office catalogue)."""

import json

import pytest

from rec.cli import build_parser
from rec.errors import RecError


def _args(*extra):
    return build_parser().parse_args(["bench", "rl", "--shape", "tiny", *extra])


def test_bench_rl_needs_data():
    from rec.train.rl import bench_rl

    with pytest.raises(RecError, match="--data"):
        bench_rl(_args())


@pytest.mark.slow
def test_bench_rl_prints_one_json_object(office_dir, capsys):
    from rec.bench import run_bench

    result = run_bench(_args("--data", str(office_dir), "--batch", "2", "--beams", "4", "--iters", "1",
                             "--dtype", "float32", "--fast", "off"))
    printed = json.loads(capsys.readouterr().out.strip())
    assert printed == result
    assert result["bench"] == "rl" and result["beams"] == 4 and result["prompts_per_step"] == 2
    assert result["steps_per_s"] > 0 and result["samples_per_s"] == pytest.approx(result["steps_per_s"] * 8, rel=0.01)
    assert result["fast_decode_attention"] is False
