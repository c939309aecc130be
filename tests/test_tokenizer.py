"""Tokenizer: SID token order, adding tokens, the built BPE, save/reload id parity."""

import json
import os

import pytest

from rec.data.dataset import load_catalogue
from rec.errors import RecError
from rec.tokenizer import (
    EOS_TOKEN,
    add_sid_tokens,
    build_tokenizer,
    encode,
    load_tokenizer,
    newline_id,
    save_tokenizer,
    sid_tokens,
)


def test_sid_tokens_plain_string_order():
    index = {"0": ["<a_14>", "<b_2>", "<c_7>"], "1": ["<a_104>", "<b_10>", "<c_7>"], "2": ["<a_14>", "<b_2>", "<c_30>", "<d_1>"]}
    # hand-sorted: '<a_104>' < '<a_14>' because '0' < '4'; all a < b < c < d
    expected = ["<a_104>", "<a_14>", "<b_10>", "<b_2>", "<c_30>", "<c_7>", "<d_1>"]
    assert sid_tokens(index) == expected
    assert sid_tokens(list(index.values())) == expected


def test_real_index_token_counts(industrial_dir, office_dir):
    # reference §1.4: 560 / 600 new tokens
    assert len(sid_tokens(json.loads((industrial_dir / "index.json").read_text()))) == 560
    assert len(sid_tokens(load_catalogue(office_dir))) == 600


def test_built_tokenizer_properties(synth_tokenizer_dir, synth_dataset_dir):
    tok = load_tokenizer(synth_tokenizer_dir)
    cat = load_catalogue(synth_dataset_dir)
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == EOS_TOKEN and tok.padding_side == "left"
    assert tok.convert_tokens_to_ids("<|endoftext|>") != tok.eos_token_id
    assert encode(tok, "\n") == [newline_id(tok)]
    tokens = sid_tokens(cat)
    ids = tok.convert_tokens_to_ids(tokens)
    # SID tokens were added after the BPE vocabulary, consecutively, in sorted order
    assert ids == list(range(ids[0], ids[0] + len(tokens)))
    assert ids[0] == 400 and len(tok) == 400 + len(tokens)
    for sid, sid_toks in zip(cat.sids, cat.sid_tokens, strict=True):
        assert encode(tok, sid) == tok.convert_tokens_to_ids(list(sid_toks))
        assert encode(tok, sid + "\n") == tok.convert_tokens_to_ids(list(sid_toks)) + [newline_id(tok)]
    history = ", ".join(cat.sids[:3])
    assert tok.decode(encode(tok, history)) == history
    text = f"The user has interacted with items {history} in chronological order."
    assert tok.decode(encode(tok, text)) == text
    # no BOS / no specials from encode
    assert encode(tok, "abc")[0] != tok.eos_token_id


def test_save_and_reload_keeps_ids(synth_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = load_tokenizer(synth_tokenizer_dir)
    again = AutoTokenizer.from_pretrained(synth_tokenizer_dir)
    text = "### Response:\n<a_1><b_1><c_1>\n Acme Glue 12-Pack"  # SID tokens may or may not exist
    assert again.encode(text, add_special_tokens=False) == encode(tok, text)
    assert again.get_vocab() == tok.get_vocab()
    # adding more tokens, saving and reloading keeps every id
    assert add_sid_tokens(tok, ["<d_0>", "<d_1>"]) == 2
    assert add_sid_tokens(tok, ["<d_0>", "<d_1>"]) == 0
    save_tokenizer(tok, str(tmp_path / "t"))
    reloaded = load_tokenizer(str(tmp_path / "t"))
    assert reloaded.get_vocab() == tok.get_vocab()
    assert encode(reloaded, "<a_1><d_1>") == encode(tok, "<a_1><d_1>")


def test_tokenizer_from_gcs_leaves_no_download_behind(gcs_bucket, synth_tokenizer_dir, tmp_path, monkeypatch):
    """A gs:// tokenizer loads like the local one, and its temporary download is removed."""
    import tempfile

    from rec import storage

    tok = load_tokenizer(synth_tokenizer_dir)
    url = f"gs://{gcs_bucket}/runs/r1/tokenizer"
    save_tokenizer(tok, url)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    remote = load_tokenizer(url)
    assert remote.get_vocab() == tok.get_vocab()
    assert encode(remote, "<a_1><b_1>") == encode(tok, "<a_1><b_1>")
    save_tokenizer(remote, str(tmp_path / "again"))  # still saveable once its files are gone
    assert load_tokenizer(str(tmp_path / "again")).get_vocab() == tok.get_vocab()
    assert not list(scratch.glob("rec-*"))  # downloads removed (torch keeps its own dir)
    assert storage.listdir(url)  # the bucket copy is untouched


def test_add_sid_tokens_only_missing_in_order(synth_tokenizer_dir, synth_dataset_dir):
    tok = load_tokenizer(synth_tokenizer_dir)
    n = len(tok)
    existing = list(load_catalogue(synth_dataset_dir).sid_tokens[0])  # already in the tokenizer
    new = ["<a_900>", "<a_91>", "<b_5000>"]
    added = add_sid_tokens(tok, sorted(set(existing + new)))
    assert added == 3 and len(tok) == n + 3
    assert tok.convert_tokens_to_ids(["<a_900>", "<a_91>", "<b_5000>"]) == [n, n + 1, n + 2]
    assert encode(tok, "<a_900><a_91>") == [n, n + 1]


def test_build_is_deterministic(synth_dataset_dir, tmp_path):
    a = build_tokenizer(synth_dataset_dir, str(tmp_path / "a"), vocab_size=300)
    b = build_tokenizer(synth_dataset_dir, str(tmp_path / "b"), vocab_size=300)
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    assert sorted(os.listdir(a)) == sorted(os.listdir(b))
    tok = load_tokenizer(a)
    assert tok.convert_tokens_to_ids(sid_tokens(load_catalogue(synth_dataset_dir)))[0] == 300


def test_errors(tmp_path, synth_dataset_dir):
    with pytest.raises(RecError, match="tokenizer directory not found"):
        load_tokenizer(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(RecError, match="no tokenizer files"):
        load_tokenizer(str(tmp_path / "empty"))
    with pytest.raises(RecError, match="vocab_size"):
        build_tokenizer(synth_dataset_dir, str(tmp_path / "small"), vocab_size=100)


def test_newline_must_be_one_token():
    class TwoTokenNewline:
        def encode(self, text, add_special_tokens=False):
            return [1, 2]

    with pytest.raises(RecError, match="single token"):
        newline_id(TwoTokenNewline())


def test_cli_builds_a_tokenizer(synth_dataset_dir, tmp_path, capsys):
    from rec.cli import main

    out = str(tmp_path / "cli_tok")
    assert main(["tokenizer", "build", "--dataset", synth_dataset_dir, "--out", out, "--vocab-size", "300"]) == 0
    assert capsys.readouterr().out.strip() == out
    assert load_tokenizer(out).eos_token == EOS_TOKEN
