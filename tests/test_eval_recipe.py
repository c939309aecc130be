"""`rec recipe small-cpu`: the whole recipe in one command (tiny end to end), and its configs."""

import json
import shutil

import numpy as np
import pytest

from rec.cli import main
from rec.config import load_config
from rec.errors import RecError
from rec.recipe import parse_stage_overrides, run_recipe, write_recipe


def _without_train_csv(synth_dataset_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(synth_dataset_dir, data)
    (data / "train.csv").unlink()  # like the public snapshot
    return data


def test_small_cpu_configs_without_train_csv(synth_dataset_dir, tmp_path):
    data = _without_train_csv(synth_dataset_dir, tmp_path)
    out = tmp_path / "recipe"
    assert write_recipe("small-cpu", str(out), data_dir=str(data), runs_dir=str(tmp_path / "runs")) == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "eval.yaml", "rl.yaml", "sft.yaml"]
    sft, rl, ev = (load_config(str(out / f"{s}.yaml")) for s in ("sft", "rl", "eval"))
    assert sft.data.dir == rl.data.dir == ev.data.dir == str(data)
    # training rows from valid (+ prefix windows), selection on its held-out slice, eval on test
    assert sft.data.train_from == rl.data.train_from == "valid" and sft.data.select_fraction > 0
    assert ev.data.split == "test" and sft.data.split == "test"
    assert rl.model.path == sft.run.dir and rl.model.checkpoint == "sft_best"
    assert ev.model.path == rl.run.dir and ev.model.checkpoint == "rl_best" and rl.rl.best_metric == "ndcg@10"
    assert sft.model.tokenizer == rl.model.tokenizer == str(tmp_path / "runs" / "tokenizer")
    assert sft.data.tasks == rl.rl.tasks == ["sid_sequence"] and ev.eval.prompt == rl.eval.prompt == "sequence"
    assert sft.train.dropout > 0 and rl.train.dropout == 0
    readme = (out / "README.md").read_text()
    assert f"rec tokenizer build --dataset {data}" in readme and f"rec sft  --config {out}/sft.yaml\n" in readme
    assert "This dataset has no `train.csv`" in readme and "overrides" not in readme


def test_configs_only_cli_with_train_csv(synth_dataset_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["recipe", "small-cpu", "--configs-only", "--out", str(out), "--data", synth_dataset_dir]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    sft = load_config(str(out / "sft.yaml"))
    assert sft.data.train_split == "train" and sft.data.train_from == ""
    assert "These configs train on the dataset's `train.csv`" in (out / "README.md").read_text()
    # writing again over its own output is fine; over anything else, or without a dataset, it is not
    assert main(["recipe", "small-cpu", "--configs-only", "--out", str(out), "--data", synth_dataset_dir]) == 0
    with pytest.raises(RecError, match="unknown name"):
        write_recipe("huge-tpu", str(tmp_path / "x"), data_dir=synth_dataset_dir)
    assert not (tmp_path / "x").exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "README.md").write_text("my project\n")
    capsys.readouterr()
    assert main(["recipe", "small-cpu", "--configs-only", "--out", str(mine), "--data", synth_dataset_dir]) == 2
    assert "not empty and not an earlier set of recipe configs" in capsys.readouterr().err
    assert (mine / "README.md").read_text() == "my project\n" and sorted(p.name for p in mine.iterdir()) == ["README.md"]
    assert main(["recipe", "small-cpu", "--configs-only", "--out", str(tmp_path / "y")]) == 2
    assert "--data: the configs name the dataset" in capsys.readouterr().err


def test_stage_overrides_and_refusals(synth_dataset_dir, tmp_path, capsys):
    assert parse_stage_overrides(["sft:train.steps=3", "eval:eval.beams=5"]) == {
        "sft": ["train.steps=3"], "rl": [], "eval": ["eval.beams=5"]}
    with pytest.raises(RecError, match="STAGE:key=value"):
        parse_stage_overrides(["train.steps=3"])
    # a bad override is reported before anything is written
    out = tmp_path / "run"
    assert main(["recipe", "small-cpu", "--data", synth_dataset_dir, "--out", str(out),
                 "--set", "sft:train.stpes=3"]) == 2
    assert "train.stpes" in capsys.readouterr().err and not out.exists()
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    with pytest.raises(RecError, match="not empty and not an earlier recipe run"):
        run_recipe("small-cpu", synth_dataset_dir, str(tmp_path / "busy"))
    # an earlier run with another seed: resuming it would mix the two runs, so it is refused
    from rec.recipe import MARKER, _prepare_out

    earlier = tmp_path / "earlier"
    _prepare_out(str(earlier), f"recipe small-cpu\ndata {synth_dataset_dir}\nseed 42\n")
    (earlier / "sft").mkdir()
    with pytest.raises(RecError, match=r"holds a recipe run with other arguments \(recipe small-cpu; data .*; seed 42\)"):
        run_recipe("small-cpu", synth_dataset_dir, str(earlier), seed=7)
    assert (earlier / MARKER).read_text().endswith("seed 42\n")


@pytest.mark.slow
def test_recipe_end_to_end_tiny(synth_dataset_dir, tmp_path, capsys):
    data = _without_train_csv(synth_dataset_dir, tmp_path)
    out = tmp_path / "run"
    args = ["recipe", "small-cpu", "--data", str(data), "--out", str(out), "--baseline-seeds", "2",
            "--set", "sft:train.steps=30", "--set", "sft:train.eval_every=15", "--set", "rl:train.steps=4",
            "--set", "rl:rl.eval_every=2", "--set", "eval:eval.beams=10", "--set", "sft:run.progress=false",
            "--set", "rl:run.progress=false", "--set", "eval:run.progress=false"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out / "report.html")
    for name in ("run_summary.json", "eval_predictions.json", "report.html", "baselines.json", "tokenizer",
                 "configs/sft.yaml", "sft/run_summary.json", "rl/run_summary.json", "sft/eval_predictions.json"):
        assert (out / name).exists(), name
    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["eval/num_samples"] == summary["sft/eval/num_samples"] > 0
    assert summary["eval/invalid_prediction_count"] == 0 and summary["eval/beams"] == 10
    for method in ("popularity", "transition", "sasrec"):
        assert 0.0 <= summary[f"baselines/{method}/hr@10"] <= 1.0
    assert summary["recipe/train_from"] == "valid" and summary["recipe/rl_checkpoint"] == "rl_best"
    readme = (out / "configs" / "README.md").read_text()  # the commands reproduce the run: overrides included
    assert f"rec sft  --config {out}/configs/sft.yaml train.steps=30 train.eval_every=15 run.progress=false\n" in readme
    predictions = json.loads((out / "eval_predictions.json").read_text())
    assert len(predictions) == summary["eval/num_samples"] and len(predictions[0]["predict"]) == 10
    html = (out / "report.html").read_text()
    assert "SFT" in html and "RL" in html and "sasrec" in html
    # SFT, RL and the baselines trained on the same rows: valid + prefix windows, minus the selection slice
    import yaml

    from rec.data.dataset import read_split
    from rec.data.windows import windowed_rows

    train_rows, select_rows = windowed_rows(read_split(str(data), "valid"), 0.1)
    sft_config = yaml.safe_load((out / "sft" / "config.yaml").read_text())
    rl_config = yaml.safe_load((out / "rl" / "config.yaml").read_text())
    assert sft_config["data"]["train_from"] == rl_config["data"]["train_from"] == "valid"
    # sid_sequence trains the longest sequences among those rows; RL prompts are the rows themselves
    from rec.data.windows import longest_sequences
    assert sft_config["resolved"]["train_examples"] == len(longest_sequences(train_rows))
    assert rl_config["resolved"]["num_prompts"] == len(train_rows)
    assert sft_config["resolved"]["valid_examples"] == len(select_rows)
    sasrec = json.loads((out / "baselines.json").read_text())["sasrec"]
    assert (sasrec["train_rows"], sasrec["select_rows"]) == (len(train_rows), len(select_rows))


def test_compact_prompt_is_one_wording_everywhere(synth_dataset_dir, synth_tokenizer_dir):
    from rec.data import prompts as P
    from rec.data.dataset import load_catalogue, read_split
    from rec.data.rl import rl_prompts
    from rec.data.sft import build_sft_examples, build_valid_examples, sft_prompts
    from rec.tokenizer import add_sid_tokens, load_tokenizer, sid_tokens

    row = read_split(synth_dataset_dir, "valid", limit=1)[0]
    p = P.sid_next_compact(row.history_sids, row.item_sid)
    assert p.header == "" and p.body == "History: " + "".join(row.history_sids) + "\n### Response:\n"
    assert p.target == row.item_sid + "\n"
    # SFT rows, RL prompts and eval prompts read the same text
    cat = load_catalogue(synth_dataset_dir)
    assert sft_prompts(cat, [row], ["sid_next_compact"], "x", 0)[0] == p
    assert rl_prompts(cat, [row], ["sid_next_compact"])[0].text == p.body
    assert P.eval_prompt(row.history_sids, row.item_sid, "compact").body == p.body
    tok = load_tokenizer(synth_tokenizer_dir)
    add_sid_tokens(tok, sid_tokens(cat))
    train = build_sft_examples(tok, cat, [row], ["sid_next_compact"], "x", 0, 64)
    valid = build_valid_examples(tok, [row], 64, "compact")
    assert train[0].input_ids.tolist() == valid[0].input_ids.tolist()
    assert len(valid[0].input_ids) < len(build_valid_examples(tok, [row], 4096)[0].input_ids) / 2
    with pytest.raises(RecError, match="eval.prompt"):
        load_config(None, ["eval.prompt=short"])


def test_sequence_task_trains_every_position_of_the_eval_text(synth_dataset_dir, synth_tokenizer_dir):
    """`sid_sequence`: one row per longest sequence, "History: " + the SIDs + "\n" + EOS, labelled
    from the second history item on; the eval/RL prompt is the same text cut after the history, so
    its tokens are a prefix of the training row's."""
    from rec.data import prompts as P
    from rec.data.dataset import load_catalogue, read_split
    from rec.data.rl import rl_prompts
    from rec.data.sft import IGNORE, build_sft_examples, build_valid_examples, eval_prompt_ids, valid_wording
    from rec.data.windows import expand_windows, longest_sequences
    from rec.tokenizer import add_sid_tokens, load_tokenizer, sid_tokens

    cat = load_catalogue(synth_dataset_dir)
    tok = load_tokenizer(synth_tokenizer_dir)
    add_sid_tokens(tok, sid_tokens(cat))
    rows = [r for r in read_split(synth_dataset_dir, "valid", limit=20) if len(r.history_sids) >= 2]
    windows = expand_windows(rows)
    seq = build_sft_examples(tok, cat, windows, ["sid_sequence"], "x", 0, 4096)
    kept = longest_sequences(windows)
    assert len(seq) == len(kept) < len(windows)
    sid_ids = set(tok.convert_tokens_to_ids(sid_tokens(cat)))
    eos = tok.eos_token_id
    for row, ex, prompt_ids in zip(kept, seq, eval_prompt_ids(tok, cat, kept, "sequence"), strict=True):
        ids = ex.input_ids.tolist()
        assert ids[: len(prompt_ids)] == prompt_ids and ids[-1] == eos
        assert tok.decode(ids[len(prompt_ids) : -1]) == row.item_sid + "\n"
        labelled = ex.labels != IGNORE
        assert (ex.labels[labelled] == ex.input_ids[labelled]).all()
        # unlabelled: "History: " and the first item's SID tokens; labelled: all the rest
        first = int(np.argmax(labelled))
        assert labelled[first:].all()
        assert sum(int(t) in sid_ids for t in ex.input_ids[:first]) == row.history_sids[0].count("<")
        assert sum(int(t) in sid_ids for t in ex.input_ids[labelled]) == sum(
            s.count("<") for s in (*row.history_sids[1:], row.item_sid)
        )
    # validation, RL and eval read the same prompt text
    assert valid_wording(["sid_sequence"]) == "sequence" and valid_wording(["sid_sequence", "sid_next"]) == "sft"
    row = kept[0]
    valid = build_valid_examples(tok, [row], 4096, "sequence")[0]
    # validation scores the next item only: its SID tokens, not the "\n" + EOS that end the sequence
    assert valid.input_ids.tolist() == seq[0].input_ids.tolist()[:-2]
    assert (valid.labels != IGNORE).sum() == row.item_sid.count("<")
    assert rl_prompts(cat, [row], ["sid_sequence"])[0].text == P.eval_prompt(row.history_sids, row.item_sid, "sequence").body
    assert load_config(None, ["eval.prompt=sequence"]).eval.prompt == "sequence"
