"""`rec data check DIR`: list every problem of a dataset directory as "file:row: message".

Covers: required files present (index.json, info.txt, item.json, at least one split CSV); JSON
well-formed; index ids 0..N-1 with 3 or 4 level-ordered SID tokens; item.json has the same ids and a
title each; info.txt lines well-formed, in id order, SID and title agreeing with index.json and
item.json; every CSV: header, field count, list literals, history lengths agreeing, item ids in
range, SIDs known, each SID and title equal to the catalogue's for its item id.
Rows are file line numbers (CSV header = line 1) or the item id key for JSON files.
"""

from __future__ import annotations

from rec import storage
from rec.data.dataset import (
    INDEX_FILE,
    INFO_FILE,
    ITEM_FILE,
    META_FILE,
    SPLITS,
    iter_csv_records,
    parse_info_line,
    row_from_fields,
    sid_tokens_problem,
    split_path,
)
from rec.errors import RecError


class _Problems:
    """Collects messages; stops collecting (but keeps counting) past `limit`."""

    def __init__(self, limit: int):
        self.limit = max(1, limit)
        self.lines: list[str] = []
        self.extra = 0

    def add(self, where: str, message: str) -> None:
        self.add_line(f"{where}: {message}")

    def add_line(self, line: str) -> None:
        if len(self.lines) < self.limit:
            self.lines.append(line)
        else:
            self.extra += 1

    def result(self, directory: str) -> list[str]:
        if self.extra:
            return self.lines + [f"{directory}: {self.extra} more problem(s) not listed"]
        return self.lines


def _load_json(path: str, problems: _Problems):
    try:
        return storage.read_json(path)
    except RecError as exc:  # already "file[:line]: message"
        problems.add_line(str(exc))
    return None


def check_dataset(directory: str, max_problems: int = 50) -> list[str]:
    """Every problem found (at most `max_problems` lines, plus one line counting the rest)."""
    directory = str(directory)
    problems = _Problems(max_problems)
    join = lambda name: storage.join(directory, name)  # noqa: E731
    if not storage.isdir(directory):
        return [f"{directory}: not a directory"]

    for name in (INDEX_FILE, INFO_FILE, ITEM_FILE):
        if not storage.exists(join(name)):
            problems.add(join(name), "required file is missing")
    splits = [s for s in SPLITS if storage.exists(split_path(directory, s))]
    if not splits:
        problems.add(directory, "no split CSV (train.csv, valid.csv or test.csv)")

    # index.json -> SID per item id
    sids: dict[int, str] = {}
    index_path = join(INDEX_FILE)
    index = _load_json(index_path, problems) if storage.exists(index_path) else None
    if index is not None and not isinstance(index, dict):
        problems.add(index_path, "expected a JSON object mapping item ids to SID token lists")
        index = None
    if index is not None:
        for key, tokens in index.items():
            if not key.isdigit() or str(int(key)) != key:
                problems.add(f"{index_path}:{key}", "item id key is not a non-negative integer")
                continue
            problem = sid_tokens_problem(tokens)
            if problem:
                problems.add(f"{index_path}:{key}", problem)
                continue
            sids[int(key)] = "".join(tokens)
        n = len(index)
        missing = [i for i in range(n) if str(i) not in index]
        if missing:
            problems.add(index_path, f"item ids must be 0..{n - 1}; missing {len(missing)}, e.g. {missing[0]}")
    n_items = len(index) if index is not None else 0
    known_sids = set(sids.values())

    # item.json -> titles
    titles: dict[int, str] = {}
    item_path = join(ITEM_FILE)
    items = _load_json(item_path, problems) if storage.exists(item_path) else None
    if items is not None and not isinstance(items, dict):
        problems.add(item_path, "expected a JSON object mapping item ids to features")
        items = None
    if items is not None:
        for key, features in items.items():
            where = f"{item_path}:{key}"
            if not key.isdigit() or (index is not None and key not in index):
                problems.add(where, f"item id is not in {INDEX_FILE}")
                continue
            if not isinstance(features, dict) or not isinstance(features.get("title"), str):
                problems.add(where, "expected an object with a string 'title'")
                continue
            description = features.get("description", "")
            if description is not None and not isinstance(description, (str, list)):
                problems.add(where, f"'description' should be text, got {type(description).__name__}")
            titles[int(key)] = features["title"]
        if index is not None:
            absent = [k for k in index if k not in items]
            if absent:
                problems.add(item_path, f"{len(absent)} item(s) of {INDEX_FILE} missing, e.g. {absent[0]}")

    # info.txt: SID \t title \t id, in id order
    info_path = join(INFO_FILE)
    info_titles: dict[int, str] = {}
    if storage.exists(info_path):
        lines = storage.read_text(info_path).splitlines()
        for number, line in enumerate(lines, start=1):
            where = f"{info_path}:{number}"
            parsed, err = parse_info_line(line)
            if err:
                problems.add(where, err)
                continue
            sid, title, item_id = parsed
            if index is not None and not 0 <= item_id < n_items:
                problems.add(where, f"item id {item_id} is not in {INDEX_FILE} (0..{n_items - 1})")
                continue
            if item_id != number - 1:
                problems.add(where, f"item id {item_id} out of order (line {number} should hold item {number - 1})")
            if item_id in info_titles:
                problems.add(where, f"item id {item_id} appears twice")
            info_titles[item_id] = title
            if item_id in sids and sid != sids[item_id]:
                problems.add(where, f"SID {sid} differs from {INDEX_FILE} for item {item_id} ({sids[item_id]})")
            if item_id in titles and title != titles[item_id]:
                problems.add(where, f"title differs from {ITEM_FILE} for item {item_id}")
        if index is not None and len(info_titles) != n_items:
            lacking = [i for i in range(n_items) if i not in info_titles]
            if lacking:
                problems.add(info_path, f"{len(lacking)} item(s) of {INDEX_FILE} have no line, e.g. item {lacking[0]}")
    info_sids = {sids[i] for i in info_titles if i in sids}

    # meta.json (optional)
    meta_path = join(META_FILE)
    if storage.exists(meta_path):
        meta = _load_json(meta_path, problems)
        if meta is not None and (not isinstance(meta, dict) or not isinstance(meta.get("category"), str) or not meta["category"]):
            problems.add(meta_path, "expected an object with a non-empty string 'category'")

    for split in splits:
        _check_split(split_path(directory, split), sids, known_sids, info_sids, titles, n_items, index is not None, problems)
    return problems.result(directory)


def _check_split(path, sids, known_sids, info_sids, titles, n_items, have_index, problems: _Problems) -> None:
    try:
        records = list(iter_csv_records(path, storage.read_text(path)))
    except RecError as exc:  # already "file:row: message"
        problems.add_line(str(exc))
        return
    if not records:
        problems.add(path, "no data rows")

    def check_item(where: str, what: str, item_id: int, sid: str, title: str) -> None:
        if have_index and not 0 <= item_id < n_items:
            problems.add(where, f"{what} item id {item_id} out of range (0..{n_items - 1})")
            return
        if have_index and sid not in known_sids:
            problems.add(where, f"{what} SID {sid} is not in {INDEX_FILE}")
        elif info_sids and sid not in info_sids:
            problems.add(where, f"{what} SID {sid} is not in {INFO_FILE}")
        if item_id in sids and sid != sids[item_id]:
            problems.add(where, f"{what} SID {sid} differs from item {item_id}'s SID in {INDEX_FILE} ({sids[item_id]})")
        if item_id in titles and title != titles[item_id]:
            problems.add(where, f"{what} title differs from {ITEM_FILE} for item {item_id}")

    for line, fields in records:
        where = f"{path}:{line}"
        if isinstance(fields, str):
            problems.add(where, fields)
            continue
        row, err = row_from_fields(fields)
        if err:
            problems.add(where, err)
            continue
        check_item(where, "target", row.item_id, row.item_sid, row.item_title)
        for position, (item_id, sid, title) in enumerate(zip(row.history_ids, row.history_sids, row.history_titles, strict=True)):
            check_item(where, f"history[{position}]", item_id, sid, title)
