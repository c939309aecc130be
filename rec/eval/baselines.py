"""`rec baselines`: non-LLM reference rows for the report, scored with the same calc.py metrics
(`rec.eval.metrics.compute_metrics`: SID level, HR@K/NDCG@K, every row of the evaluated split).

- `popularity`: the most frequent training targets first, the same list for every user.
- `transition`: item-to-item transitions ("after X, users took Y") from each training row's last
  history item to its target, scored over the row's history with weights decaying towards older
  items, backfilled with popularity so every user gets `k` distinct SIDs.
- `sasrec`: a small causal Transformer over SIDs (rec/eval/sasrec.py), full-softmax loss, early
  stopping on the selection rows; over >= 2 seeds, mean and std reported.

What the baselines learn from: exactly the rows `rec sft`/`rec rl` train on
(`rec.data.windows.training_rows`): with `--train-from valid` (the default when there is no
train.csv and test is scored) every valid row plus every prefix window of its history,
de-duplicated; the last `--select-fraction` of the source rows is held out for SASRec's early
stopping. The evaluated split is never used for fitting, not even its histories: a user's later
rows hold the earlier rows' targets in their histories, so fitting on them would leak. At
prediction time each row's own history is used, as a model would use its prompt.
Items are compared as SID strings, like the metric.
"""

from __future__ import annotations

import json
import os
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
    """Metrics of the popularity and transition baselines. `fit_pairs`: the (history, target)
    training rows; each row counts once: its target for popularity, its last history item ->
    target for transitions (the rows already hold every prefix window, rec/data/windows.py, so
    every consecutive pair of a sequence is one row). `eval_pairs`: (history, target) to score
    (each row's own history is its input)."""
    counts = popularity_counts([t] for _, t in fit_pairs)
    # every catalogue SID can be recommended; never-seen ones go last (count 0, in SID order)
    for sid in catalogue_sids:
        counts.setdefault(sid, 0)
    popular = ranked_by_count(counts)
    table = transition_counts([h[-1], t] for h, t in fit_pairs if len(h))
    records = {"popularity": [], "transition": []}
    for history, target in eval_pairs:
        records["popularity"].append({"output": target + "\n", "predict": popularity_predict(popular, k)})
        records["transition"].append({"output": target + "\n", "predict": transition_predict(history, table, popular, k)})
    valid = set(catalogue_sids)
    return {name: compute_metrics(recs, valid) for name, recs in records.items()}


def score_sasrec(
    fit_pairs, select_pairs, eval_pairs, catalogue_sids: Sequence[str], k: int = 50, seeds: Sequence[int] = (0, 1),
    cfg=None, progress: bool = False,
) -> dict:
    """SASRec over several seeds: mean metrics, plus `std` (sample std over seeds), `per_seed`,
    `best_epochs` (chosen on the selection pairs) and the settings used."""
    import dataclasses  # noqa: PLC0415

    import numpy as np  # noqa: PLC0415

    from rec.eval import sasrec  # noqa: PLC0415

    cfg = cfg or sasrec.SASRecConfig()
    valid = set(catalogue_sids)
    per_seed, best_epochs = [], []
    for seed in seeds:
        result = sasrec.fit(fit_pairs, select_pairs, catalogue_sids, cfg, seed=int(seed), progress=progress)
        predicted = sasrec.predict(result.params, cfg, [h for h, _ in eval_pairs], catalogue_sids, k)
        records = [{"output": t + "\n", "predict": p} for (_, t), p in zip(eval_pairs, predicted, strict=True)]
        per_seed.append(compute_metrics(records, valid))
        best_epochs.append(result.best_epoch)
    keys = [key for key in per_seed[0] if "@" in key]
    out: dict = {key: float(np.mean([m[key] for m in per_seed])) for key in keys}
    out.update({key: per_seed[0][key] for key in ("invalid_prediction_count", "num_samples", "beams")})
    if len(per_seed) > 1:  # one seed has no spread to report (not a spread of zero)
        out["std"] = {key: float(np.std([m[key] for m in per_seed], ddof=1)) for key in keys}
    out["seeds"] = [int(s) for s in seeds]
    out["per_seed"] = [{key: m[key] for key in keys} for m in per_seed]
    out["best_epochs"] = best_epochs
    out["config"] = dataclasses.asdict(cfg)
    return out


def _pairs(rows) -> list[tuple[list[str], str]]:
    return [(list(row.history_sids), row.item_sid) for row in rows]


def baseline_rows(data_dir: str, split: str, train_from: str | None = None, select_fraction: float = 0.1):
    """(training rows, selection rows, evaluated rows), the same rows `rec sft`/`rec rl` use for
    `data.train_from=<train_from> data.split=<split>`. `train_from=None`: the train split when the
    dataset has train.csv (selection: valid when scoring test, else the last `select_fraction` of
    the train rows), else the split before `split` (valid for test)."""
    from rec.config import DataConfig  # noqa: PLC0415
    from rec.data.dataset import available_splits, read_split  # noqa: PLC0415
    from rec.data.windows import split_for_selection, training_rows  # noqa: PLC0415

    if split not in SPLIT_ORDER:
        raise RecError(f"--split: expected one of {', '.join(SPLIT_ORDER)}, got {split!r}")
    have = available_splits(data_dir)
    if train_from is None:
        earlier = [s for s in SPLIT_ORDER[: SPLIT_ORDER.index(split)] if s in have]
        if "train" in earlier:
            train_from = ""
        elif earlier:
            train_from = earlier[-1]
        else:
            raise RecError(
                f"{data_dir}: no split before '{split}' to train the baselines on (has: {', '.join(have) or 'none'}); "
                "e.g. --split test --train-from valid"
            )
    data_cfg = DataConfig(dir=data_dir, split=split, train_from=train_from, train_split="train",
                          valid_split="valid" if split == "test" and "valid" in have else "",
                          select_fraction=select_fraction)
    train, select = training_rows(data_cfg)
    if not select:
        train, select = split_for_selection(train, select_fraction or 0.1)
    return train, select, read_split(data_dir, split)


def format_table(results: dict, ks: Sequence[int] = (1, 3, 5, 10, 20, 50)) -> str:
    """Methods x HR@K / NDCG@K; SASRec as mean ± std over its seeds."""
    cols = [f"hr@{k}" for k in ks] + [f"ndcg@{k}" for k in ks]
    cols = [c for c in cols if any(c in r for r in results.values())]
    width = 15
    lines = ["method".ljust(12) + "".join(c.rjust(width) for c in cols)]
    for name, figures in results.items():
        std = figures.get("std", {})
        cells = []
        for c in cols:
            value = figures.get(c)
            text = "-" if value is None else f"{value:.4f}" + (f"±{std[c]:.4f}" if c in std else "")
            cells.append(text.rjust(width))
        lines.append(name.ljust(12) + "".join(cells))
    return "\n".join(lines)


def run_baselines(data_dir: str, split: str = "test", out: str = "", k: int = 50, echo: bool = True,
                  train_from: str | None = None, select_fraction: float = 0.1, seeds: Sequence[int] = (0, 1),
                  sasrec_cfg=None, progress: bool = True) -> dict:
    """`rec baselines`: popularity, transition and SASRec (over `seeds`; none = skip) on `split`;
    prints a table (echo) and writes JSON to `out`."""
    import sys  # noqa: PLC0415

    from rec.data.dataset import load_catalogue  # noqa: PLC0415

    if out:  # checked now: the fits take minutes, and their figures must not be lost at the end
        if storage.isdir(out):
            raise RecError(f"--out {out}: is a directory; name the JSON file to write")
        if not storage.is_gcs(out):
            storage.check_output_dir(os.path.dirname(os.path.abspath(out)), "--out")
    catalogue = load_catalogue(data_dir)
    train, select, eval_rows = baseline_rows(data_dir, split, train_from, select_fraction)
    sids = sorted(set(catalogue.all_sids))
    k = min(k, len(sids))
    # popularity / transition have nothing to select: they fit on training + selection rows
    results = score_baselines(_pairs(train) + _pairs(select), _pairs(eval_rows), sids, k=k)
    if seeds:
        if progress:
            print(f"sasrec: {len(train)} training rows, {len(select)} selection rows, seeds {list(seeds)}",
                  file=sys.stderr, flush=True)
        results["sasrec"] = score_sasrec(_pairs(train), _pairs(select), _pairs(eval_rows), sids, k=k, seeds=seeds,
                                         cfg=sasrec_cfg, progress=progress)
        results["sasrec"].update(train_rows=len(train), select_rows=len(select))
    if echo:  # the table first: a failing write must not take the figures with it
        print(f"{split} split of {data_dir}: {len(eval_rows)} rows, {k} recommendations each")
        print(format_table(results), flush=True)
    if out:
        storage.write_text(out, json.dumps(results, indent=2) + "\n")
    return results
