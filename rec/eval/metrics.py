"""HR@K / NDCG@K exactly as upstream MiniOneRec's `calc.py` computes them.

The definition (reference/minionerec-upstream.md §8.2), which `rec eval` reports and `rec metrics`
recomputes from an `eval_predictions.json`:

- each prediction is cleaned with `.strip('"\\n').strip()`; the target is `output.strip(' \\n"')`
  (a list-valued output uses its first element, stripped of quotes then spaces);
- predictions are walked best first; every one that is not an SID of the catalogue (column 1 of
  info.txt) adds to the invalid count, and the walk stops at the FIRST exact match, whose 0-based
  index is the rank (no match: rank = 1e6). So invalid predictions after the match are not counted;
- HR@k = mean 1[rank < k], NDCG@k = mean 1[rank < k] / log2(rank + 2) (one relevant item, IDCG = 1);
- k runs over {1, 3, 5, 10, 20, 50} restricted to k <= n_beam, the length of the FIRST sample's
  prediction list.

Sums are accumulated in sample order and divided the way calc.py divides (sum of 1/ln(rank+2), then
/N/(1/ln 2)) so that the figures agree with calc.py to the last bit, not just to rounding.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence

from rec import storage
from rec.errors import RecError

DEFAULT_TOPK: tuple[int, ...] = (1, 3, 5, 10, 20, 50)
NO_MATCH_RANK = 1_000_000


def clean_prediction(text: str) -> str:
    return text.strip('"\n').strip()


def clean_target(output) -> str:
    if isinstance(output, list):
        if not output:
            raise ValueError("empty list as output")
        return str(output[0]).strip('"').strip(" ")
    return str(output).strip(' \n"')


def first_match_rank(predictions: Sequence[str], target: str, valid_sids: set[str] | frozenset[str]) -> tuple[int, int]:
    """(rank of the first exact match or NO_MATCH_RANK, invalid predictions seen up to and including it)."""
    invalid = 0
    for index, pred in enumerate(predictions):
        if pred not in valid_sids:
            invalid += 1
        if pred == target:
            return index, invalid
    return NO_MATCH_RANK, invalid


def ndcg_gain(rank: int) -> float:
    """calc.py's per-sample NDCG term before its final /(1/ln 2): 1/ln(rank+2)."""
    return 1.0 / math.log(rank + 2)


def compute_metrics(predictions: Sequence[dict], valid_sids: Iterable[str], topk: Sequence[int] = DEFAULT_TOPK) -> dict:
    """calc.py's figures for a list of `{"output": ..., "predict": [...]}` records.

    Returns a flat dict: `hr@K`, `ndcg@K` for K in `topk` with K <= n_beam, `invalid_prediction_count`,
    `num_samples`, `beams` (n_beam). Malformed records raise `RecError` naming the sample index.
    """
    valid = frozenset(valid_sids)
    if not predictions:
        raise RecError("predictions: empty list, nothing to score")
    n_beam = -1
    ks: list[int] = []
    hit_sums: list[float] = []
    ndcg_sums: list[float] = []
    invalid_total = 0
    for index, record in enumerate(predictions):
        if not isinstance(record, dict) or "predict" not in record or "output" not in record:
            raise RecError(f"predictions[{index}]: expected an object with 'output' and 'predict'")
        raw_preds = record["predict"]
        if not isinstance(raw_preds, list) or not all(isinstance(p, str) for p in raw_preds):
            raise RecError(f"predictions[{index}]: 'predict' must be a list of strings")
        try:
            target = clean_target(record["output"])
        except ValueError as exc:
            raise RecError(f"predictions[{index}]: 'output' is not usable ({exc})") from None
        preds = [clean_prediction(p) for p in raw_preds]
        if n_beam == -1:
            n_beam = len(preds)
            ks = [k for k in topk if k <= n_beam]
            hit_sums = [0.0] * len(ks)
            ndcg_sums = [0.0] * len(ks)
        rank, invalid = first_match_rank(preds, target, valid)
        invalid_total += invalid
        for j, k in enumerate(ks):
            if rank < k:
                hit_sums[j] += 1.0
                ndcg_sums[j] += ndcg_gain(rank)
    n = len(predictions)
    out: dict = {}
    for j, k in enumerate(ks):
        out[f"hr@{k}"] = hit_sums[j] / n
        out[f"ndcg@{k}"] = ndcg_sums[j] / n / (1.0 / math.log(2))
    out["invalid_prediction_count"] = invalid_total
    out["num_samples"] = n
    out["beams"] = n_beam
    return out


def read_valid_sids(info_path_or_dataset_dir: str) -> set[str]:
    """Column 1 of info.txt (a dataset directory means its info.txt), stripped, as calc.py reads it."""
    path = info_path_or_dataset_dir
    if storage.isdir(path):
        path = storage.join(path, "info.txt")
    if not storage.exists(path):
        raise RecError(f"{path}: info file not found")
    sids = set()
    for line in storage.read_text(path).splitlines():
        if line.strip():
            sids.add(line.split("\t")[0].strip())
    if not sids:
        raise RecError(f"{path}: no SIDs found (expected lines 'SID<TAB>title<TAB>item id')")
    return sids


def read_predictions(path: str) -> list[dict]:
    if not storage.exists(path):
        raise RecError(f"{path}: predictions file not found")
    data = storage.read_json(path)
    if not isinstance(data, list):
        raise RecError(f"{path}: expected a JSON list of {{input, output, predict}} objects")
    return data


def format_table(metrics: dict) -> str:
    """Human-readable figures: one header line, then one row per K."""
    ks = sorted(int(key.split("@")[1]) for key in metrics if key.startswith("hr@"))
    lines = [
        f"samples {metrics['num_samples']}  beams {metrics['beams']}  "
        f"invalid predictions {metrics['invalid_prediction_count']}",
        f"{'K':>4}  {'HR@K':>8}  {'NDCG@K':>8}",
    ]
    lines += [f"{k:>4}  {metrics[f'hr@{k}']:>8.4f}  {metrics[f'ndcg@{k}']:>8.4f}" for k in ks]
    return "\n".join(lines)


def metrics_main(predictions_path: str, info_path_or_dataset_dir: str, as_json: bool = False) -> dict:
    """`rec metrics`: score an eval_predictions.json against a catalogue and print the figures."""
    valid = read_valid_sids(info_path_or_dataset_dir)
    predictions = read_predictions(predictions_path)
    try:
        metrics = compute_metrics(predictions, valid)
    except RecError as exc:
        raise RecError(f"{os.fspath(predictions_path)}: {exc}") from None
    if as_json:
        print(json.dumps(metrics, sort_keys=False))
    else:
        print(format_table(metrics))
    return metrics
