"""Training rows for a dataset without a train split (`data.train_from`), and the held-out
selection slice every stage selects on.

The public MiniOneRec snapshot ships only valid.csv and test.csv. With `data.train_from=valid`
the training rows are built from the valid split alone, never from the evaluated split
(`data.split`, test by default; the same split is a RecError):

1. selection slice: the LAST `data.select_fraction` of the source split's rows in file order
   (at least one row when the fraction is > 0). MiniOneRec files list each user's rows together,
   oldest first, so this holds out the latest rows of the last users. These rows are what model
   selection looks at: SFT validation loss (`sft_best`, early stopping), RL validation
   (`rl_best`), SASRec early stopping. They are never trained on.
2. training rows: every remaining row PLUS every prefix window inside its history
   (hist[:i] -> hist[i] for i >= 1), de-duplicated: the same history (item ids) with the same
   target is one row, kept at its first occurrence. Order: source row by source row, each row's
   windows shortest first, then the row itself; deterministic.

Without `data.train_from`, the training rows are `data.train_split` as before and the selection
rows are `data.valid_split`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from rec.data.dataset import Row
from rec.errors import RecError


def prefix_windows(row: Row) -> list[Row]:
    """The row's full sequence (history + target) cut at every position i >= 1:
    seq[:i] -> seq[i]. The last window is the row itself."""
    ids = (*row.history_ids, row.item_id)
    sids = (*row.history_sids, row.item_sid)
    titles = (*row.history_titles, row.item_title)
    return [
        Row(
            user_id=row.user_id,
            history_titles=titles[:i],
            item_title=titles[i],
            history_ids=ids[:i],
            item_id=ids[i],
            history_sids=sids[:i],
            item_sid=sids[i],
        )
        for i in range(1, len(ids))
    ]


def row_key(row: Row) -> tuple[tuple[int, ...], int]:
    """Identity of a training example: history item ids and target item id."""
    return tuple(row.history_ids), row.item_id


def expand_windows(rows: Iterable[Row]) -> list[Row]:
    """Every row and every prefix window inside its history, de-duplicated, in a fixed order."""
    seen: set = set()
    out: list[Row] = []
    for row in rows:
        for window in prefix_windows(row):
            key = row_key(window)
            if key not in seen:
                seen.add(key)
                out.append(window)
    return out


def item_sequence(row: Row) -> tuple[int, ...]:
    """The row's items in order: history, then target."""
    return (*row.history_ids, row.item_id)


def longest_sequences(rows: Iterable[Row]) -> list[Row]:
    """The rows whose item sequence is not a proper prefix of another row's (the first of equal
    sequences), in input order. A task that is trained on every position of a sequence
    (`sid_sequence`) sees each shorter prefix row inside a longer one already, so they
    would only repeat its predictions."""
    rows = list(rows)
    prefixes: set[tuple[int, ...]] = set()
    for row in rows:
        seq = item_sequence(row)
        prefixes.update(seq[:i] for i in range(2, len(seq)))
    seen: set[tuple[int, ...]] = set()
    out: list[Row] = []
    for row in rows:
        seq = item_sequence(row)
        if seq not in prefixes and seq not in seen:
            seen.add(seq)
            out.append(row)
    return out


def consecutive_pairs(rows: Iterable[Row]) -> list[tuple[str, str]]:
    """Every distinct (item SID, next item SID) of the rows' item sequences, in first-seen order:
    the pairs an item-to-item transition table counts."""
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str]] = []
    for row in rows:
        sids = (*row.history_sids, row.item_sid)
        for pair in zip(sids, sids[1:], strict=False):
            if pair not in seen:
                seen.add(pair)
                out.append(pair)
    return out


def selection_count(n_rows: int, fraction: float) -> int:
    """How many of `n_rows` source rows the selection slice holds (>= 1 when fraction > 0,
    always leaving at least one row to train on)."""
    if not 0.0 <= fraction < 1.0:
        raise RecError(f"config: 'data.select_fraction' must be in [0, 1), got {fraction}")
    if fraction == 0.0 or n_rows < 2:
        return 0
    return min(n_rows - 1, max(1, math.ceil(fraction * n_rows)))


def split_for_selection(rows: Sequence[Row], fraction: float) -> tuple[list[Row], list[Row]]:
    """(rows to train on, held-out selection rows = the last `fraction` in file order)."""
    n_select = selection_count(len(rows), fraction)
    cut = len(rows) - n_select
    return list(rows[:cut]), list(rows[cut:])


def windowed_rows(rows: Sequence[Row], fraction: float) -> tuple[list[Row], list[Row]]:
    """(training rows with prefix windows, selection rows) from one source split."""
    train, select = split_for_selection(rows, fraction)
    return expand_windows(train), select


def check_train_from(data_cfg) -> None:
    """`data.train_from` must name a split other than the evaluated one."""
    source = data_cfg.train_from
    if not source:
        return
    from rec.data.dataset import SPLITS  # noqa: PLC0415

    if source not in SPLITS:
        raise RecError(f"config: 'data.train_from' must be one of {', '.join(SPLITS)} (or empty), got {source!r}")
    if source == data_cfg.split:
        raise RecError(
            f"config: 'data.train_from' ({source}) is the evaluated split 'data.split'; train from an earlier "
            "split (e.g. data.train_from=valid data.split=test)"
        )


def training_rows(data_cfg, selection_limit: int = -1) -> tuple[list[Row], list[Row]]:
    """(training rows, selection rows) as configured by `data` (see the module docstring).

    `data.limit` bounds the source rows read; `selection_limit` (>= 0) keeps only the first rows
    of the selection set (e.g. `train.eval_limit`)."""
    from rec.data.dataset import read_split  # noqa: PLC0415

    check_train_from(data_cfg)
    if data_cfg.train_from:
        source = read_split(data_cfg.dir, data_cfg.train_from, limit=data_cfg.limit, key="data.train_from")
        if not source:
            raise RecError(f"{data_cfg.dir}: split '{data_cfg.train_from}' (data.train_from) has no rows")
        train, select = windowed_rows(source, data_cfg.select_fraction)
    else:
        train = read_split(data_cfg.dir, data_cfg.train_split, limit=data_cfg.limit, key="data.train_split")
        if not train:
            raise RecError(f"{data_cfg.dir}: split '{data_cfg.train_split}' (data.train_split) has no rows")
        select = read_split(data_cfg.dir, data_cfg.valid_split, limit=selection_limit, key="data.valid_split") if data_cfg.valid_split else []
    if selection_limit >= 0:
        select = select[:selection_limit]
    return train, select


def training_source(data_cfg) -> str:
    """The split the training rows come from (for messages and file:line lookups)."""
    return data_cfg.train_from or data_cfg.train_split
