"""`rec recipe small-cpu`: a complete, valid config set for a real dataset directory."""

import pytest

from rec.cli import main
from rec.config import load_config
from rec.errors import RecError
from rec.recipe import write_recipe


def test_small_cpu_recipe_without_train_csv(synth_dataset_dir, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(synth_dataset_dir, data)
    (data / "train.csv").unlink()  # like the public snapshot
    out = tmp_path / "recipe"
    assert write_recipe("small-cpu", str(out), data_dir=str(data), runs_dir=str(tmp_path / "runs")) == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "eval.yaml", "rl.yaml", "sft.yaml"]
    sft, rl, ev = (load_config(str(out / f"{s}.yaml")) for s in ("sft", "rl", "eval"))
    assert sft.data.dir == rl.data.dir == ev.data.dir == str(data)
    assert sft.data.train_split == rl.data.train_split == "valid"
    assert rl.model.path == sft.run.dir and rl.model.checkpoint == "sft_best"
    assert ev.model.path == rl.run.dir and ev.model.checkpoint == "rl_last" and ev.data.split == "test"
    assert sft.model.tokenizer == rl.model.tokenizer == str(tmp_path / "runs" / "tokenizer")
    readme = (out / "README.md").read_text()
    assert f"rec tokenizer build --dataset {data}" in readme and f"rec sft  --config {out}/sft.yaml" in readme


def test_recipe_with_train_csv_and_cli(synth_dataset_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["recipe", "small-cpu", "--out", str(out), "--data", synth_dataset_dir]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert load_config(str(out / "sft.yaml")).data.train_split == "train"
    with pytest.raises(RecError, match="unknown name"):
        write_recipe("huge-tpu", str(tmp_path / "x"))
    assert not (tmp_path / "x").exists()
