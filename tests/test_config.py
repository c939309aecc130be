"""The typed config: YAML + dotted overrides, and the errors users see for bad keys and values."""

import pathlib
import subprocess
import sys

import pytest

from rec.config import Config, dump_yaml, env_flag, load_config
from rec.errors import RecError

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_defaults_match_upstream_recipe():
    cfg = Config()
    assert cfg.train.lr == 3e-4 and cfg.train.batch_size == 1024 and cfg.train.warmup_steps == 20
    assert cfg.eval.beams == 50 and cfg.data.max_len == 512
    assert cfg.rl.generations == 16 and cfg.rl.beta == 1e-3
    assert (cfg.rl.ref_sync_alpha, cfg.rl.ref_sync_every) == (0.6, 512)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  steps: 10\n  lr: 1.0e-3\neval:\n  topk: [1, 5]\n")
    cfg = load_config(str(path), ["train.steps=20", "run.dir=gs://bucket/run", "eval.beams=10", "data.tasks=sid_next"])
    assert cfg.train.steps == 20
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.run.dir == "gs://bucket/run"
    assert cfg.eval.beams == 10 and cfg.eval.topk == [1, 5]
    assert cfg.data.tasks == ["sid_next"]


def test_int_accepted_for_float_and_paths_with_colons():
    cfg = load_config(None, ["train.lr=1", "model.path=/a:b/c"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.model.path == "/a:b/c"


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.stpes=3", "unknown key 'train.stpes' (did you mean 'train.steps'?)"),
        ("nosuch.key=1", "unknown key 'nosuch'"),
        ("train.steps=ten", "'train.steps': expected an integer, got 'ten'"),
        ("train.steps=1.5", "'train.steps': expected an integer"),
        ("run.progress=maybe", "'run.progress': expected true/false"),
        ("train=3", "'train' is a section"),
        ("train.schedule=exp", "'train.schedule' must be one of"),
        ("eval.beams=0", "'eval.beams' must be positive"),
        ("train.batch_size=10", "must be a multiple of 'train.micro_batch_size'"),
        ("nokey", "expected key=value"),
        ("eval.topk=[0,10]", "'eval.topk' must be a non-empty list of cut-offs >= 1, got [0, 10]"),
        ("eval.topk=[]", "'eval.topk' must be a non-empty list"),
    ],
)
def test_bad_overrides_name_the_key(override, needle):
    extra = ["train.micro_batch_size=4"] if "multiple" in needle else []
    with pytest.raises(RecError) as err:
        load_config(None, extra + [override])
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  steps: [1,\n")
    with pytest.raises(RecError, match=r"bad\.yaml:\d+: not valid YAML"):
        load_config(str(path))
    path.write_text("train:\n  bogus: 1\n")
    with pytest.raises(RecError, match=r"bad\.yaml: unknown key 'train\.bogus'"):
        load_config(str(path))
    path.write_text("- a\n- b\n")
    with pytest.raises(RecError, match="expected a mapping"):
        load_config(str(path))
    with pytest.raises(RecError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))


def test_dump_round_trips(tmp_path):
    cfg = load_config(None, ["train.steps=7", "rl.reward=rule"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_yaml(cfg, extra={"fast_generate": True}))
    import yaml

    data = yaml.safe_load(path.read_text())
    assert data.pop("resolved") == {"fast_generate": True}
    path.write_text(yaml.safe_dump(data))
    assert load_config(str(path)) == cfg


def test_env_flag(monkeypatch):
    monkeypatch.delenv("ROLLOUT_FAST_GENERATE", raising=False)
    assert env_flag("ROLLOUT_FAST_GENERATE", "auto") is True
    assert env_flag("ROLLOUT_FAST_GENERATE", "off") is False
    monkeypatch.setenv("ROLLOUT_FAST_GENERATE", "0")
    assert env_flag("ROLLOUT_FAST_GENERATE", "auto") is False
    assert env_flag("ROLLOUT_FAST_GENERATE", "on") is False  # the variable wins when set
    monkeypatch.setenv("ROLLOUT_FAST_GENERATE", "1")
    assert env_flag("ROLLOUT_FAST_GENERATE", "off") is True


def test_every_shipped_config_loads():
    configs = sorted((ROOT / "configs").rglob("*.yaml"))
    for path in configs:
        load_config(str(path))


def test_cli_bad_key_is_one_line_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "rec", "eval", "train.stpes=1", f"run.dir={tmp_path}/out"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == ["error: override: unknown key 'train.stpes' (did you mean 'train.steps'?)"]
    assert not (tmp_path / "out").exists()


def test_cli_unusable_paths_are_one_line_errors(tmp_path, capsys):
    """Paths the user names that cannot be written or read: one line naming the path, exit 2,
    for quick commands (through the CLI's OSError handling) and before the heavy work of runs."""
    from rec.cli import main

    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cases = [
        (["data", "synth", "--out", str(a_file)], f"error: {a_file}: File exists"),
        (["data", "synth", "--out", str(a_file / "sub")], f"error: {a_file / 'sub'}: Not a directory"),
        (["eval", "data.dir=x", f"run.dir={a_file}/out"], f"error: run.dir {a_file}/out: {a_file} exists and is not a directory"),
        (["sft", "data.dir=x", f"run.dir={a_file}"], f"error: run.dir {a_file}: {a_file} exists and is not a directory"),
        (["eval", "data.dir=x", "eval.beams=10", "eval.topk=[20,50]"],
         "error: config: 'eval.topk' [20, 50] has no cut-off <= 'eval.beams' (10)"),
    ]
    for argv, expected in cases:
        assert main(argv) == 2, argv
        assert capsys.readouterr().err.strip().splitlines()[-1] == expected


def test_out_of_accelerator_memory_is_one_line_and_exit_3(monkeypatch, capsys):
    """A real XLA RESOURCE_EXHAUSTED (an 8 TiB allocation on the CPU backend) ends the command
    with one line and exit 3, which the JobSet fails at once instead of recreating the slice."""
    import jax.numpy as jnp

    import rec.cli
    from rec.errors import EXIT_RESOURCE_EXHAUSTED, FAIL_FAST_EXIT_CODES

    def allocate_too_much(args):
        jnp.zeros((2**41,), jnp.float32).block_until_ready()

    monkeypatch.setattr(rec.cli, "cmd_eval", allocate_too_much)
    assert rec.cli.main(["eval"]) == EXIT_RESOURCE_EXHAUSTED == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: out of accelerator memory (RESOURCE_EXHAUSTED: Out of memory")
    assert EXIT_RESOURCE_EXHAUSTED in FAIL_FAST_EXIT_CODES


def test_other_runtime_errors_keep_their_traceback_and_exit_1(monkeypatch):
    import rec.cli

    def crash(args):
        raise RuntimeError("INTERNAL: something else")

    monkeypatch.setattr(rec.cli, "cmd_eval", crash)
    with pytest.raises(RuntimeError):
        rec.cli.main(["eval"])
