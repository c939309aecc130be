"""`rec eval`: constrained beam search over a dataset split, scored as upstream calc.py.

Steps (reference/minionerec-upstream.md §8, §11):
1. read the catalogue and ALL rows of `data.split` (or the first `eval.limit`); every target and
   history SID must be in the catalogue (`file:line: unknown SID` otherwise);
2. build upstream's eval prompt per row (`eval.prompt=eval`: evaluate.py's wording; `sft`: the SFT
   next-SID wording), header and body tokenized separately;
3. group rows by prompt length into a few buckets, cut each bucket into batches of exactly
   `eval.batch_size` prompts (the last one filled with repeats), left-pad to the bucket length: one
   compiled decode program per bucket, fixed shapes on device;
4. `constrained_beam_search` with `eval.beams` beams; decoded SIDs are mapped back to row order;
5. write `eval_predictions.json` (list in row order of {input, output, predict}) and merge
   `eval/*` figures into `run_summary.json` (keeping `train/*`), both atomically, at the very end,
   so a failed run leaves nothing half-written.

Multi-process: every process builds the same batches (token ids are cheap); the batch is sharded
over the mesh's batch axes, so each process's devices decode their share of the rows; results are
all-gathered and process 0 writes the files.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence

import numpy as np

from rec import storage
from rec.errors import RecError
from rec.eval.metrics import compute_metrics

PREDICTIONS_FILE = "eval_predictions.json"
SUMMARY_FILE = "run_summary.json"


# ---------------------------------------------------------------------------------------------
# Pure helpers (tested directly)


def check_rows(path: str, rows, catalogue_sids: set[str], line_numbers: Sequence[int] | None = None) -> None:
    """RecError naming the file line of the first row whose target or history SID is unknown."""
    for index, row in enumerate(rows):
        unknown = [s for s in (row.item_sid, *row.history_sids) if s not in catalogue_sids]
        if unknown:
            line = line_numbers[index] if line_numbers else index + 2
            what = "item_sid" if unknown[0] == row.item_sid else "history_item_sid"
            raise RecError(f"{path}:{line}: unknown SID {unknown[0]} in column '{what}' (not in info.txt/index.json)")


def choose_buckets(
    lengths: Sequence[int], multiple: int = 16, quantiles: Sequence[float] = (0.5, 0.9, 1.0), min_rows_per_bucket: int = 0
) -> list[int]:
    """A few padded prompt lengths covering every prompt: the given length quantiles rounded up to
    `multiple` (so at most len(quantiles) compiles, and the longest prompt always fits). With fewer
    than `min_rows_per_bucket` rows per quantile, one bucket: compiling would cost more than padding."""
    if not lengths:
        raise ValueError("no prompts")
    if len(lengths) < min_rows_per_bucket * len(quantiles):
        quantiles = (1.0,)
    ordered = sorted(lengths)
    buckets = set()
    for q in quantiles:
        value = ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]
        buckets.add(int(math.ceil(value / multiple) * multiple))
    buckets.add(int(math.ceil(ordered[-1] / multiple) * multiple))
    return sorted(buckets)


def plan_batches(lengths: Sequence[int], buckets: Sequence[int], batch_size: int) -> list[tuple[int, list[int]]]:
    """[(bucket length, row indices)]: each row goes to the smallest bucket that holds it; rows keep
    their order inside a bucket; every list has at most `batch_size` rows."""
    by_bucket: dict[int, list[int]] = {b: [] for b in buckets}
    for index, length in enumerate(lengths):
        fitting = [b for b in buckets if b >= length]
        if not fitting:
            raise ValueError(f"prompt {index} has {length} tokens, longer than every bucket {list(buckets)}")
        by_bucket[min(fitting)].append(index)
    plan = []
    for bucket in sorted(by_bucket):
        rows = by_bucket[bucket]
        plan += [(bucket, rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]
    return plan


def left_pad(token_lists: Sequence[Sequence[int]], length: int, pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """[batch_size, length] int32 tokens and mask, prompts right-aligned; missing rows repeat the
    first prompt (their results are dropped) so shapes never change."""
    tokens = np.full((batch_size, length), pad_id, dtype=np.int32)
    mask = np.zeros((batch_size, length), dtype=np.int32)
    for i in range(batch_size):
        ids = token_lists[i] if i < len(token_lists) else token_lists[0]
        if len(ids) > length:
            raise ValueError(f"prompt of {len(ids)} tokens does not fit {length}")
        if ids:
            tokens[i, length - len(ids) :] = ids
            mask[i, length - len(ids) :] = 1
    return tokens, mask


def summary_figures(metrics: dict, samples_per_s: float) -> dict:
    """compute_metrics output -> the flat eval/* keys of run_summary.json."""
    figures = {f"eval/{k}": v for k, v in metrics.items() if "@" in k}
    figures["eval/invalid_prediction_count"] = int(metrics["invalid_prediction_count"])
    figures["eval/num_samples"] = int(metrics["num_samples"])
    figures["eval/beams"] = int(metrics["beams"])
    figures["eval/samples_per_s"] = float(samples_per_s)
    return figures


def merge_summary(existing: dict, figures: dict) -> dict:
    """Replace every eval/* key of an existing summary (a re-run with fewer beams must not keep a
    stale eval/hr@50) and keep everything else (train/*, ...)."""
    merged = {k: v for k, v in existing.items() if not k.startswith("eval/")}
    merged.update(figures)
    return merged


# ---------------------------------------------------------------------------------------------
# Driver


def _csv_lines(path: str, n_rows: int) -> list[int]:
    """File line of each of the first n_rows data records (for error messages)."""
    from rec.data.dataset import iter_csv_records

    lines = []
    for line, _ in iter_csv_records(path, storage.read_text(path)):
        if len(lines) >= n_rows:
            break
        lines.append(line)
    return lines


def _read_summary(path: str) -> dict:
    """An existing run_summary.json (train/* figures to keep), or {}."""
    if not storage.exists(path):
        return {}
    try:
        existing = storage.read_json(path)
    except RecError as exc:
        raise RecError(f"{exc}; fix or remove it") from None
    if not isinstance(existing, dict):
        raise RecError(f"{path}: expected a JSON object")
    return existing


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="row", file=sys.stderr, disable=not enabled, dynamic_ncols=True)


def decode_tables(tokenizer, catalogue):
    """(SID trie, token id -> token string list) for constrained decoding over the catalogue;
    built once per run (the list is one tokenizer call, not one per SID token)."""
    from rec.decode.trie import trie_from_sids
    from rec.tokenizer import newline_id

    trie = trie_from_sids(catalogue.all_sids, tokenizer, newline_id(tokenizer), tokenizer.eos_token_id)
    return trie, tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))


def eval_token_lists(tokenizer, rows, style: str):
    """(eval prompts, their token ids) for `rows` in the `eval.prompt` wording `style`; header and
    body are tokenized separately, as upstream."""
    from rec.data.prompts import eval_prompt
    from rec.tokenizer import encode

    prompts = [eval_prompt(r.history_sids, r.item_sid, style=style) for r in rows]
    return prompts, [encode(tokenizer, p.header) + encode(tokenizer, p.body) for p in prompts]


def decode_rows(params, shape, token_lists, mesh, *, trie, id_to_token, beams: int, batch_size: int,
                pad_id: int, compute_dtype, buckets, on_batch=None) -> tuple[list[list[str]], float]:
    """Constrained beam search over every prompt of `token_lists`: ([SID list, best first] per
    prompt in input order, seconds spent tracing and compiling). Prompts are grouped into
    `buckets` and cut into fixed-shape batches; one batch is in flight, so batch i+1 is padded and
    dispatched before batch i is fetched and decoded to strings and the host work hides behind
    the device's. `on_batch(n)` is called as each batch of n prompts completes (progress)."""
    from rec.decode.beam import constrained_beam_search, decode_sids
    from rec.dist import process_allgather, shard_batch

    lengths = [len(t) for t in token_lists]
    predictions: list = [None] * len(token_lists)
    seen_buckets: set[int] = set()
    compile_s = 0.0

    def collect(indices, sids) -> None:
        sids = np.asarray(process_allgather(sids))  # blocks until that batch is decoded
        for row_index, sid_list in zip(indices, decode_sids(id_to_token, sids[: len(indices)]), strict=True):
            predictions[row_index] = sid_list
        if on_batch is not None:
            on_batch(len(indices))

    pending = None
    for bucket, indices in plan_batches(lengths, buckets, batch_size):
        tokens, mask = left_pad([token_lists[i] for i in indices], bucket, pad_id, batch_size)
        g_tokens, g_mask = shard_batch((tokens, mask), mesh)
        dispatch_start = time.perf_counter()
        sids, _scores = constrained_beam_search(params, shape, g_tokens, g_mask, trie, beams, compute_dtype=compute_dtype)
        if bucket not in seen_buckets:  # tracing + compilation happen inside the call
            compile_s += time.perf_counter() - dispatch_start
            seen_buckets.add(bucket)
        if pending is not None:
            collect(*pending)
        pending = (indices, sids)
    if pending is not None:
        collect(*pending)
    return predictions, compile_s


def ranking_metrics(params, shape, rows, tokenizer, catalogue, mesh, *, prompt_style: str, batch_size: int,
                    beams: int, topk, pad_id: int, compute_dtype, trie, id_to_token) -> dict[str, float]:
    """HR@K / NDCG@K of `params` on `rows` with `beams` constrained beams: the validation that SFT
    `train.best_metric` and RL `rl.best_metric` select on, the same decode as `rec eval`.
    `trie`, `id_to_token`: the caller's `decode_tables`."""
    from rec.eval.metrics import compute_metrics

    prompts, token_lists = eval_token_lists(tokenizer, rows, prompt_style)
    predictions, _ = decode_rows(params, shape, token_lists, mesh, trie=trie, id_to_token=id_to_token, beams=beams,
                                 batch_size=batch_size, pad_id=pad_id, compute_dtype=compute_dtype,
                                 buckets=choose_buckets([len(t) for t in token_lists]))
    records = [{"input": p.text, "output": r.item_sid + "\n", "predict": pred}
               for p, r, pred in zip(prompts, rows, predictions, strict=True)]
    ks = [k for k in topk if k <= beams] or [beams]
    metrics = compute_metrics(records, set(catalogue.all_sids), ks)
    return {k: float(v) for k, v in metrics.items() if "@" in k}


def check_best_metric(key: str, metric: str, beams_key: str, beams: int) -> None:
    """`metric` ("" or e.g. hr@10 / ndcg@5) must be computable from `beams` beams."""
    if not metric:
        return
    name, _, k = metric.partition("@")
    if name not in ("hr", "ndcg") or not k.isdigit():
        raise RecError(f"config: '{key}' must look like hr@10 or ndcg@5, got {metric!r}")
    if int(k) > beams:
        raise RecError(f"config: '{key}' {metric} needs at least that many '{beams_key}' ({beams})")


SELECTION_SPLIT = "selection"  # data.split value: the held-out selection slice of data.train_from


def run_eval(cfg) -> dict:
    """Evaluate `model.path` on `data.split`; write eval_predictions.json and run_summary.json into
    `run.dir`; return the run_summary figures."""
    import jax.numpy as jnp

    from rec.data.dataset import load_catalogue, read_split, split_path
    from rec.dist import batch_divisor, init_distributed, is_primary, make_mesh
    from rec.train.common import eos_and_pad_ids, load_model_and_tokenizer, model_source

    if not cfg.data.dir:
        raise RecError("config: 'data.dir' is empty; set it to a MiniOneRec dataset directory")
    if all(k > cfg.eval.beams for k in cfg.eval.topk):
        # calc.py scores only K <= beams; with none left the run would end with no figure at all
        raise RecError(f"config: 'eval.topk' {cfg.eval.topk} has no cut-off <= 'eval.beams' ({cfg.eval.beams})")
    storage.check_output_dir(cfg.run.dir, "run.dir")
    init_distributed()
    catalogue = load_catalogue(cfg.data.dir)
    if cfg.data.split == SELECTION_SPLIT:
        # the held-out slice every training stage selects on: what recipe choices are judged by
        from rec.data.windows import training_rows  # noqa: PLC0415

        if not cfg.data.train_from:
            raise RecError(f"config: 'data.split={SELECTION_SPLIT}' needs 'data.train_from' (the split it is cut from)")
        rows = training_rows(cfg.data, selection_limit=cfg.eval.limit)[1]
        path = split_path(cfg.data.dir, cfg.data.train_from)
    else:
        rows = read_split(cfg.data.dir, cfg.data.split, limit=cfg.eval.limit, key="data.split")
        path = split_path(cfg.data.dir, cfg.data.split)
    if not rows:
        raise RecError(f"{path}: no rows to evaluate")
    known = set(catalogue.all_sids)
    if any(s not in known for r in rows for s in (r.item_sid, *r.history_sids)):
        # line numbers only for a file read from its top (the selection slice is its tail)
        check_rows(path, rows, known, None if cfg.data.split == SELECTION_SPLIT else _csv_lines(path, len(rows)))

    beams = cfg.eval.beams
    if beams > len(known):
        raise RecError(f"config: 'eval.beams' ({beams}) is more than the {len(known)} distinct SIDs of the catalogue")
    _read_summary(storage.join(cfg.run.dir, SUMMARY_FILE))  # a damaged summary fails now, not after decoding
    source = model_source(cfg, "eval")

    mesh = make_mesh(cfg.mesh.shape)
    if cfg.eval.batch_size % batch_divisor(mesh):
        raise RecError(
            f"config: 'eval.batch_size' ({cfg.eval.batch_size}) must be a multiple of the {batch_divisor(mesh)} "
            f"devices on the batch axes of mesh '{cfg.mesh.shape}'"
        )
    shape, params, tok = load_model_and_tokenizer(cfg, catalogue, "eval", mesh=mesh, source=source)
    _eos_id, pad_id = eos_and_pad_ids(tok, cfg)  # a one-line error when the tokenizer has no EOS
    trie, id_to_token = decode_tables(tok, catalogue)

    prompts, token_lists = eval_token_lists(tok, rows, cfg.eval.prompt)
    # A compile costs about as much as decoding a few dozen batches on CPU and a few on TPU.
    buckets = choose_buckets([len(t) for t in token_lists], min_rows_per_bucket=16 * cfg.eval.batch_size)
    compute_dtype = jnp.dtype(cfg.model.compute_dtype)

    progress = _progress(len(rows), cfg.run.progress and is_primary(), f"eval {cfg.data.split}")
    loop_start = time.perf_counter()
    predictions, compile_s = decode_rows(params, shape, token_lists, mesh, trie=trie, id_to_token=id_to_token,
                                         beams=beams, batch_size=cfg.eval.batch_size, pad_id=pad_id,
                                         compute_dtype=compute_dtype, buckets=buckets, on_batch=progress.update)
    progress.close()
    total_s = time.perf_counter() - loop_start
    steady_s = total_s - compile_s
    samples_per_s = len(rows) / steady_s if steady_s > 0 else len(rows) / max(total_s, 1e-9)

    records = [
        {"input": p.header + p.body, "output": r.item_sid + "\n", "predict": pred}
        for p, r, pred in zip(prompts, rows, predictions, strict=True)
    ]
    metrics = compute_metrics(records, known, topk=cfg.eval.topk)
    figures = summary_figures(metrics, samples_per_s)
    # which rows and which weights the figures are for: run.dir may hold an earlier eval of another
    figures.update({"eval/split": cfg.data.split, "eval/model": str(source)})
    if is_primary():
        run_dir = cfg.run.dir
        summary_path = storage.join(run_dir, SUMMARY_FILE)
        storage.write_text(storage.join(run_dir, PREDICTIONS_FILE), json.dumps(records, indent=1, ensure_ascii=False) + "\n")
        # read again: training may have added figures while this eval decoded
        merged = merge_summary(_read_summary(summary_path), figures)
        storage.write_text(summary_path, json.dumps(merged, indent=2, sort_keys=True) + "\n")
        _print_figures(figures, run_dir)
    return figures


def _print_figures(figures: dict, run_dir: str) -> None:
    ks = sorted(int(k.split("@")[1]) for k in figures if k.startswith("eval/hr@"))
    print(
        f"eval: {figures['eval/num_samples']} samples, {figures['eval/beams']} beams, "
        f"invalid {figures['eval/invalid_prediction_count']}, {figures['eval/samples_per_s']:.2f} samples/s",
        file=sys.stderr,
    )
    print("  " + "  ".join(f"HR@{k} {figures[f'eval/hr@{k}']:.4f}" for k in ks), file=sys.stderr)
    print("  " + "  ".join(f"NDCG@{k} {figures[f'eval/ndcg@{k}']:.4f}" for k in ks), file=sys.stderr)
    print(f"  wrote {storage.join(run_dir, PREDICTIONS_FILE)} and {SUMMARY_FILE}", file=sys.stderr)
