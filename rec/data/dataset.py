"""Reading a MiniOneRec dataset directory (local or gs://).

A dataset directory holds (reference/minionerec-upstream.md §1):

- `train.csv`, `valid.csv`, `test.csv`: columns `user_id, history_item_title, item_title,
  history_item_id, item_id, history_item_sid, item_sid`. The `history_*` columns are Python list
  literals, parsed with `ast.literal_eval` (never `eval`). Extra columns (e.g. the `Unnamed: 0`
  index column upstream's split.py adds) are ignored. Any split may be absent: the shared real
  datasets have no train.csv, so callers train on `data.train_split=valid`.
- `info.txt`: one line per item in item-id order, `SID \\t title \\t item_id` (a title may itself
  contain a tab, so the SID is the first field and the id the last).
- `index.json`: item-id string -> list of SID token strings (`["<a_1>", "<b_2>", "<c_3>"]`, a 4th
  `<d_..>` level for de-duplicated indices).
- `item.json`: item-id string -> `{title, description, ...}`; `description` is usually the string
  form of a Python list of paragraphs.
- `meta.json` (optional, ours): `{"category": "<phrase used in prompts>"}`, written by
  `rec data synth`.

Loaders stop at the first problem with `RecError("<file>:<row>: <message>")`; CSV rows are
numbered by file line (the header is line 1). `rec.data.check.check_dataset` lists every problem.
"""

from __future__ import annotations

import ast
import csv
import io
import json
import posixpath
import re
from dataclasses import dataclass, field

from rec import storage
from rec.errors import RecError

COLUMNS = (
    "user_id",
    "history_item_title",
    "item_title",
    "history_item_id",
    "item_id",
    "history_item_sid",
    "item_sid",
)
SPLITS = ("train", "valid", "test")
INDEX_FILE, INFO_FILE, ITEM_FILE, META_FILE = "index.json", "info.txt", "item.json", "meta.json"

# One SID token: level letter a..e and a non-negative code, e.g. "<b_17>".
SID_TOKEN_RE = re.compile(r"<([a-e])_(\d+)>")
LEVEL_LETTERS = "abcde"

# Upstream `category_dict`: dataset name -> phrase used inside prompts.
CATEGORY_PHRASES = {
    "Industrial_and_Scientific": "industrial and scientific items",
    "Office_Products": "office products",
    "Toys_and_Games": "toys and games",
    "Sports": "sports and outdoors",
    "Books": "books",
}


@dataclass(frozen=True)
class Row:
    """One CSV row: a user's history (oldest first) and the next item."""

    user_id: str
    history_titles: tuple[str, ...]
    item_title: str
    history_ids: tuple[int, ...]
    item_id: int
    history_sids: tuple[str, ...]
    item_sid: str


@dataclass
class Catalogue:
    """Every item of a dataset, indexed by item id (0..N-1).

    `sids[i]` is the SID string of item i (its tokens concatenated), `sid_tokens[i]` the token
    list from index.json. Several items may share one SID (collisions); `sid_to_ids` lists them and
    `all_sids` holds each distinct SID once, in order of first appearance.
    """

    name: str
    sids: list[str]
    sid_tokens: list[tuple[str, ...]]
    titles: list[str]
    descriptions: list[str]  # raw item.json text ("" when absent)
    sid_depth: int  # tokens per SID (the longest, when an index mixes 3 and 4 levels)
    all_sids: list[str] = field(default_factory=list)
    sid_to_ids: dict[str, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.sid_to_ids:
            for item_id, sid in enumerate(self.sids):
                self.sid_to_ids.setdefault(sid, []).append(item_id)
        if not self.all_sids:
            self.all_sids = list(self.sid_to_ids)

    def __len__(self) -> int:
        return len(self.sids)

    @property
    def sid_depths(self) -> set[int]:
        """The distinct SID lengths (one value unless the index mixes 3- and 4-token SIDs)."""
        return {len(t) for t in self.sid_tokens}

    def description_texts(self, item_id: int) -> list[str]:
        """Paragraphs of an item's description (see `description_paragraphs`)."""
        return description_paragraphs(self.descriptions[item_id])


# ---------------------------------------------------------------------------------------------
# Small parsers shared with check.py: each returns an error message (or None) instead of raising,
# so the checker can list every problem while loaders stop at the first.


def description_paragraphs(raw: object) -> list[str]:
    """item.json descriptions are usually the string form of a Python list ("['p1', 'p2']");
    return the paragraphs as a list ([] for an empty description, [raw] for plain text)."""
    if isinstance(raw, list):
        return [str(p) for p in raw]
    text = "" if raw is None else str(raw)
    stripped = text.strip()
    if not stripped:
        return []
    if stripped.startswith("[") and stripped.endswith("]"):
        try:
            value = ast.literal_eval(stripped)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return [text]
        if isinstance(value, list):
            return [str(p) for p in value]
    return [text]


def sid_tokens_problem(tokens: object) -> str | None:
    """Why an index.json value is not a valid SID token list, or None."""
    if not isinstance(tokens, list) or not tokens:
        return f"expected a non-empty list of SID tokens, got {tokens!r}"
    if len(tokens) not in (3, 4):
        return f"expected 3 or 4 SID tokens, got {len(tokens)}"
    for level, token in enumerate(tokens):
        match = SID_TOKEN_RE.fullmatch(token) if isinstance(token, str) else None
        if match is None:
            return f"token {token!r} is not of the form <a_N>"
        if match.group(1) != LEVEL_LETTERS[level]:
            return f"token {token!r} at level {level + 1} should start with '<{LEVEL_LETTERS[level]}_'"
    return None


def split_sid(sid: str) -> list[str] | None:
    """'<a_1><b_2><c_3>' -> ['<a_1>', '<b_2>', '<c_3>'] (None if it is not only SID tokens)."""
    tokens = SID_TOKEN_RE.findall(sid)
    rebuilt = "".join(f"<{letter}_{code}>" for letter, code in tokens)
    if not tokens or rebuilt != sid:
        return None
    return [f"<{letter}_{code}>" for letter, code in tokens]


def parse_list_literal(text: str, element_type: type, column: str) -> tuple[list | None, str | None]:
    """Parse a Python list literal whose elements are all `element_type`: (value, error)."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError, TypeError):
        shown = text if len(text) <= 60 else text[:57] + "..."
        return None, f"column '{column}' is not a Python list literal: {shown!r}"
    if not isinstance(value, list):
        return None, f"column '{column}' should be a list, got {type(value).__name__}"
    for element in value:
        if element_type is int and (isinstance(element, bool) or not isinstance(element, int)):
            return None, f"column '{column}' should hold integers, found {element!r}"
        if element_type is str and not isinstance(element, str):
            return None, f"column '{column}' should hold strings, found {element!r}"
    return value, None


def parse_int(text: str, column: str) -> tuple[int | None, str | None]:
    try:
        return int(text.strip()), None
    except (ValueError, AttributeError):
        return None, f"column '{column}' should be an integer, got {text!r}"


def row_from_fields(fields: dict[str, str]) -> tuple[Row | None, str | None]:
    """Build a Row from one CSV record (column -> raw text): (row, error)."""
    history_titles, err = parse_list_literal(fields["history_item_title"], str, "history_item_title")
    if err:
        return None, err
    history_ids, err = parse_list_literal(fields["history_item_id"], int, "history_item_id")
    if err:
        return None, err
    history_sids, err = parse_list_literal(fields["history_item_sid"], str, "history_item_sid")
    if err:
        return None, err
    item_id, err = parse_int(fields["item_id"], "item_id")
    if err:
        return None, err
    if not (len(history_titles) == len(history_ids) == len(history_sids)):
        return None, (
            f"history lengths differ: {len(history_titles)} titles, {len(history_ids)} ids, "
            f"{len(history_sids)} SIDs"
        )
    if not history_ids:
        return None, "history is empty"
    return (
        Row(
            user_id=fields["user_id"],
            history_titles=tuple(history_titles),
            item_title=fields["item_title"],
            history_ids=tuple(history_ids),
            item_id=item_id,
            history_sids=tuple(history_sids),
            item_sid=fields["item_sid"],
        ),
        None,
    )


def iter_csv_records(path: str, text: str):
    """Yield (line_number, fields) for each data row; raise RecError on a bad header.

    A record with the wrong number of fields yields (line, None) so callers can report it."""
    # A byte-order mark (some spreadsheet exports) would otherwise glue itself to "user_id".
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise RecError(f"{path}:1: empty file, expected a header with columns {', '.join(COLUMNS)}") from None
    except csv.Error as exc:
        raise RecError(f"{path}:1: unreadable CSV header ({exc})") from None
    missing = [c for c in COLUMNS if c not in header]
    if missing:
        raise RecError(f"{path}:1: header lacks column(s) {', '.join(missing)} (has: {', '.join(header)})")
    position = {name: header.index(name) for name in COLUMNS}
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, f"unreadable CSV record ({exc})"
            continue
        line = reader.line_num
        if not values:  # blank line
            continue
        if len(values) != len(header):
            yield line, f"expected {len(header)} fields, got {len(values)}"
            continue
        yield line, {name: values[i] for name, i in position.items()}


# ---------------------------------------------------------------------------------------------
# Loaders


def _path(directory: str, name: str) -> str:
    return storage.join(str(directory), name)


def split_path(directory: str, split: str) -> str:
    return _path(directory, f"{split}.csv")


def available_splits(directory: str) -> list[str]:
    return [s for s in SPLITS if storage.exists(split_path(directory, s))]


def read_split(directory: str, split: str, limit: int = -1, key: str = "") -> list[Row]:
    """Rows of `<dir>/<split>.csv` in file order (the first `limit` when limit >= 0). `key`: the
    setting that chose the split, named in the message when the file is missing."""
    path = split_path(directory, split)
    if not storage.exists(path):
        have = available_splits(directory)
        hint = f" (this dataset has: {', '.join(have)}" if have else ""
        if hint:
            hint += f"; set {key} to one of them)" if key else ")"
        raise RecError(f"{path}: not found{hint}")
    rows: list[Row] = []
    for line, fields in iter_csv_records(path, storage.read_text(path)):
        if 0 <= limit <= len(rows):
            break
        if isinstance(fields, str):
            raise RecError(f"{path}:{line}: {fields}")
        row, err = row_from_fields(fields)
        if err:
            raise RecError(f"{path}:{line}: {err}")
        rows.append(row)
    return rows


def _load_json(path: str) -> object:
    return storage.read_json(path)


def parse_info_line(line: str) -> tuple[tuple[str, str, int] | None, str | None]:
    """'SID\\ttitle\\tid' -> ((sid, title, id), error). Titles may contain tabs."""
    parts = line.rstrip("\r\n").split("\t")
    if len(parts) < 3:
        return None, f"expected 3 tab-separated fields (SID, title, item id), got {len(parts)}"
    item_id, err = parse_int(parts[-1], "item id")
    if err:
        return None, f"last field should be the item id, got {parts[-1]!r}"
    return (parts[0], "\t".join(parts[1:-1]), item_id), None


def load_catalogue(directory: str) -> Catalogue:
    """Items from index.json (SID tokens), info.txt (order, SID, title) and item.json (titles,
    descriptions; optional). Inconsistent files raise RecError naming the file and row."""
    directory = str(directory)
    index_path, info_path, item_path = (_path(directory, n) for n in (INDEX_FILE, INFO_FILE, ITEM_FILE))
    index = _load_json(index_path)
    if not isinstance(index, dict) or not index:
        raise RecError(f"{index_path}: expected a JSON object mapping item ids to SID token lists")
    n_items = len(index)
    sid_tokens: list[tuple[str, ...]] = []
    for item_id in range(n_items):
        key = str(item_id)
        if key not in index:
            raise RecError(f"{index_path}:{key}: item id {key} missing (ids must be 0..{n_items - 1})")
        problem = sid_tokens_problem(index[key])
        if problem:
            raise RecError(f"{index_path}:{key}: {problem}")
        sid_tokens.append(tuple(index[key]))
    sids = ["".join(t) for t in sid_tokens]

    titles: list[str | None] = [None] * n_items
    info_lines = storage.read_text(info_path).splitlines()
    for number, line in enumerate(info_lines, start=1):
        if not line.strip():
            continue
        parsed, err = parse_info_line(line)
        if err:
            raise RecError(f"{info_path}:{number}: {err}")
        sid, title, item_id = parsed
        if not 0 <= item_id < n_items:
            raise RecError(f"{info_path}:{number}: item id {item_id} is not in {INDEX_FILE} (0..{n_items - 1})")
        if sid != sids[item_id]:
            raise RecError(f"{info_path}:{number}: SID {sid} differs from {INDEX_FILE} for item {item_id} ({sids[item_id]})")
        titles[item_id] = title
    missing = [i for i, t in enumerate(titles) if t is None]
    if missing:
        raise RecError(f"{info_path}: {len(missing)} item(s) of {INDEX_FILE} have no line, e.g. item {missing[0]}")

    descriptions = [""] * n_items
    if storage.exists(item_path):
        items = _load_json(item_path)
        if not isinstance(items, dict):
            raise RecError(f"{item_path}: expected a JSON object mapping item ids to features")
        for key, features in items.items():
            if not isinstance(features, dict):
                raise RecError(f"{item_path}:{key}: expected an object with title/description")
            item_id, err = parse_int(key, "item id")
            if err or not 0 <= item_id < n_items:
                raise RecError(f"{item_path}:{key}: item id not in {INDEX_FILE}")
            raw = features.get("description", "")
            descriptions[item_id] = raw if isinstance(raw, str) else json.dumps(raw)
    return Catalogue(
        name=dataset_name(directory),
        sids=sids,
        sid_tokens=sid_tokens,
        titles=[t or "" for t in titles],
        descriptions=descriptions,
        sid_depth=max(len(t) for t in sid_tokens),
    )


def dataset_name(directory: str) -> str:
    return posixpath.basename(str(directory).rstrip("/").replace("\\", "/"))


def category_phrase(directory: str) -> str:
    """The phrase upstream puts in prompts ("industrial and scientific items", ...): meta.json's
    `category` when present, else upstream's category_dict by directory name, else the name."""
    meta_path = _path(str(directory), META_FILE)
    if storage.exists(meta_path):
        meta = _load_json(meta_path)
        if not isinstance(meta, dict) or not isinstance(meta.get("category"), str) or not meta["category"]:
            raise RecError(f"{meta_path}: expected an object with a non-empty string 'category'")
        return meta["category"]
    name = dataset_name(directory)
    for key, phrase in CATEGORY_PHRASES.items():
        if name == key or name.startswith(key + "_"):
            return phrase
    return name.replace("_", " ").lower()
