"""Non-LLM reference rows for the report, scored with the same calc.py metrics.

- `popularity`: the most frequent items first, the same list for every user.
- `transition`: item-to-item transitions ("after X, users took Y"), weighted towards the most
  recent history items, backfilled with popularity so every user gets `k` distinct SIDs.

What the baselines may learn from: the (history -> target) rows of the splits BEFORE the evaluated
one (train, then valid when scoring test; a missing train.csv is simply skipped). Splits are cut by
target time, so those rows are all in the past. The evaluated split itself is NOT used for fitting,
not even its histories: a user's later rows hold the earlier rows' targets in their histories, so
fitting on them would leak (it lifts the transition baseline's HR@10 on Office test from 0.13 to
0.49). At prediction time each row's own history is used, as a model would use its prompt. With no
earlier split (valid without train.csv) there is nothing to learn from and both baselines reduce to
catalogue order: a floor, not a competitor.
Items are compared as SID strings, like the metric.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

from rec import storage
from rec.errors import RecError
from rec.eval.metrics import compute_metrics

SPLIT_ORDER = ("train", "valid", "test")


def popularity_counts(sequences: Iterable[Sequence[str]]) -> Counter:
    """How often each SID occurs anywhere in the given item sequences."""
    counts: Counter = Counter()
    for seq in sequences:
        counts.update(seq)
    return counts


def transition_counts(sequences: Iterable[Sequence[str]]) -> dict[str, Counter]:
    """{item: Counter(next item)} over consecutive pairs of every sequence."""
    table: dict[str, Counter] = defaultdict(Counter)
    for seq in sequences:
        for prev, nxt in zip(seq, seq[1:], strict=False):
            table[prev][nxt] += 1
    return table


def ranked_by_count(counts: Counter) -> list[str]:
    """Most frequent first; ties broken by SID string so results are deterministic."""
    return [sid for sid, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]


def popularity_predict(popular: Sequence[str], k: int) -> list[str]:
    return list(popular[:k])


def transition_predict(
    history: Sequence[str], table: dict[str, Counter], popular: Sequence[str], k: int, decay: float = 0.5
) -> list[str]:
    """Score = sum over history positions of decay^(distance from the end) * P(next | item), then
    popularity for the rest. Probabilities (not raw counts) so one very frequent item cannot drown
    the signal of the most recent one."""
    scores: dict[str, float] = defaultdict(float)
    weight = 1.0
    for item in reversed(history):
        successors = table.get(item)
        if successors:
            total = sum(successors.values())
            for nxt, count in successors.items():
                scores[nxt] += weight * count / total
        weight *= decay
    ranked = [sid for sid, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))][:k]
    seen = set(ranked)
    for sid in popular:
        if len(ranked) >= k:
            break
        if sid not in seen:
            ranked.append(sid)
            seen.add(sid)
    return ranked


def score_baselines(
    fit_pairs: Sequence[tuple[Sequence[str], str]],
    eval_pairs: Sequence[tuple[Sequence[str], str]],
    catalogue_sids: Sequence[str],
    k: int = 50,
) -> dict[str, dict]:
    """Metrics of both baselines. `fit_pairs`: (history, target) rows the baselines may learn from
    (earlier splits); `eval_pairs`: (history, target) to score (each row's own history is its input)."""
    fit_sequences = [list(h) + [t] for h, t in fit_pairs]
    counts = popularity_counts(fit_sequences)
    # every catalogue SID can be recommended; never-seen ones go last (count 0, in SID order)
    for sid in catalogue_sids:
        counts.setdefault(sid, 0)
    popular = ranked_by_count(counts)
    table = transition_counts(fit_sequences)
    records = {"popularity": [], "transition": []}
    for history, target in eval_pairs:
        records["popularity"].append({"output": target + "\n", "predict": popularity_predict(popular, k)})
        records["transition"].append({"output": target + "\n", "predict": transition_predict(history, table, popular, k)})
    valid = set(catalogue_sids)
    return {name: compute_metrics(recs, valid) for name, recs in records.items()}


def _pairs(rows) -> list[tuple[list[str], str]]:
    return [(list(row.history_sids), row.item_sid) for row in rows]


def run_baselines(data_dir: str, split: str = "test", out: str = "", k: int = 50, echo: bool = True) -> dict:
    """`rec baselines`: score both baselines on `split` of a dataset directory; print (and write) JSON."""
    from rec.data.dataset import load_catalogue, read_split

    if split not in SPLIT_ORDER:
        raise RecError(f"--split: expected one of {', '.join(SPLIT_ORDER)}, got {split!r}")
    catalogue = load_catalogue(data_dir)
    eval_rows = read_split(data_dir, split)
    fit_rows = []
    for earlier in SPLIT_ORDER[: SPLIT_ORDER.index(split)]:
        if storage.exists(storage.join(data_dir, f"{earlier}.csv")):
            fit_rows += read_split(data_dir, earlier)
    results = score_baselines(_pairs(fit_rows), _pairs(eval_rows), sorted(set(catalogue.all_sids)), k=k)
    text = json.dumps(results, indent=2)
    if out:
        storage.write_text(out, text + "\n")
    if echo:
        print(text)
    return results
