"""SFT token examples and fixed-shape batches.

Examples (reference §4.1): header and body are tokenized separately and concatenated (no special
tokens; Qwen has no BOS), then the target tokens and EOS. `labels` is -100 over the prompt and
equals the target ids over the target span, including its trailing "\\n" and the EOS. Labels are
*not* shifted (Hugging Face convention: the loss compares logits at t-1 with labels at t). The
last `max_len` tokens are kept (left truncation), as upstream.

Batches: examples are grouped by the smallest bucket length (`data.length_buckets`) that holds
them, so a jitted step compiles once per bucket. Every batch has exactly `batch_size` rows: the
last batch of a bucket is completed with copies of its own rows whose `weights` are 0 (they add
nothing to a weighted loss). Rows are LEFT padded with the pad id; arrays:
`input_ids, labels, attention_mask, positions` ([B, L] int32; positions = cumsum(mask) - 1, 0 on
pads) and `weights` ([B] float32). The order is a pure function of (seed, epoch); a run resumes
from (epoch, batch_index) and sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from rec.data import prompts as P
from rec.data.dataset import Catalogue, Row
from rec.data.windows import consecutive_pairs, longest_sequences
from rec.errors import RecError

IGNORE = -100


@dataclass(frozen=True)
class Example:
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n]; IGNORE on the prompt
    task: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


# ---------------------------------------------------------------------------------------------
# Prompt lists


def sft_prompts(catalogue: Catalogue, rows: Sequence[Row], tasks: Sequence[str], category: str, seed: int) -> list[P.Prompt]:
    """The upstream SFT mixture for `tasks` (names in prompts.SFT_TASKS), concatenated in task order."""
    unknown = [t for t in tasks if t not in P.SFT_TASKS]
    if unknown:
        raise RecError(f"data.tasks: unknown task '{unknown[0]}' (known: {', '.join(P.SFT_TASKS)})")
    # Upstream builds these dicts over index.json in id order: the last item wins the value, the
    # first occurrence fixes the position.
    sid_to_title: dict[str, str] = {}
    title_to_sid: dict[str, str] = {}
    for sid, title in zip(catalogue.sids, catalogue.titles, strict=True):
        sid_to_title[sid] = title
        title_to_sid[title] = sid
    out: list[P.Prompt] = []
    for task in tasks:
        if task == "sid_next":
            out += [P.sid_next(r.history_sids, r.item_sid) for r in rows]
        elif task == "sid_next_compact":
            out += [P.sid_next_compact(r.history_sids, r.item_sid) for r in rows]
        elif task == "sid_sequence":
            # every position is trained, so rows inside a longer row's sequence add nothing
            out += [P.sid_sequence(r.history_sids, r.item_sid) for r in longest_sequences(rows) if r.history_sids]
        elif task == "sid_pairs":
            # each consecutive pair once more with the previous item as the whole history, so a
            # transition seen in training is also learnt apart from the rest of its history
            out += [P.sid_pair(a, b) for a, b in consecutive_pairs(rows)]
        elif task == "sid_item_feat":
            out += [P.sid_to_title(sid, title) for sid, title in sid_to_title.items()]
            out += [P.title_to_sid(title, sid) for title, sid in title_to_sid.items()]
        elif task == "fusion_seq_rec":
            out += [P.fusion_seq_rec(r.history_sids, sid_to_title.get(r.item_sid, r.item_sid)) for r in rows]
        elif task == "title_history":
            picks = P.pick_title_history_templates(len(rows), seed)
            out += [P.title_history(r.history_titles, r.item_title, category, k) for r, k in zip(rows, picks, strict=True)]
        elif task == "title_history_sid":
            for r in rows:
                if not 0 <= r.item_id < len(catalogue):
                    raise RecError(f"row of user {r.user_id}: item_id {r.item_id} is not in the catalogue (0..{len(catalogue) - 1})")
            out += [P.title_history_sid(r.history_titles, catalogue.sids[r.item_id], category) for r in rows]
    return out


# ---------------------------------------------------------------------------------------------
# Tokenization


def _batch_encode(tok, texts: list[str]) -> list[list[int]]:
    """Encode many strings at once (the Rust tokenizer runs them in parallel); no specials."""
    if not texts:
        return []
    return [list(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]


def prompt_token_ids(tok, prompt_list: Sequence[P.Prompt]) -> list[list[int]]:
    """encode(header) + encode(body) per prompt (each part on its own, as upstream)."""
    headers = sorted({p.header for p in prompt_list})
    header_ids = dict(zip(headers, _batch_encode(tok, headers), strict=True))
    bodies = _batch_encode(tok, [p.body for p in prompt_list])
    return [header_ids[p.header] + b for p, b in zip(prompt_list, bodies, strict=True)]


def tokenize_prompts(tok, prompt_list: Sequence[P.Prompt], max_len: int, progress: bool = False) -> list[Example]:
    """Prompt + target + EOS token examples with prompt labels masked, left-truncated to max_len."""
    if tok.eos_token_id is None:
        raise RecError("tokenizer has no eos_token_id")
    eos = int(tok.eos_token_id)
    examples: list[Example] = []
    chunk = 4096
    bar = None
    if progress:
        from tqdm import tqdm  # noqa: PLC0415

        bar = tqdm(total=len(prompt_list), desc="tokenize", unit="ex", leave=False)
    for start in range(0, len(prompt_list), chunk):
        part = prompt_list[start : start + chunk]
        prompt_ids = prompt_token_ids(tok, part)
        target_ids = _batch_encode(tok, [p.target for p in part])
        for p, ids, target in zip(part, prompt_ids, target_ids, strict=True):
            target = target + [eos] if p.ends else target
            input_ids = np.asarray(ids + target, dtype=np.int32)
            labels = np.asarray([IGNORE] * len(ids) + target, dtype=np.int32)
            examples.append(Example(input_ids[-max_len:], labels[-max_len:], p.task))
        if bar is not None:
            bar.update(len(part))
    if bar is not None:
        bar.close()
    return examples


def build_sft_examples(tok, catalogue: Catalogue, rows: Sequence[Row], tasks: Sequence[str], category: str,
                       seed: int, max_len: int, progress: bool = False) -> list[Example]:
    """The training mixture as token examples."""
    return tokenize_prompts(tok, sft_prompts(catalogue, rows, tasks, category, seed), max_len, progress)


def _sequence_item_only(history_sids, item_sid: str) -> P.Prompt:
    """The `sequence` wording scored on the next item's SID tokens alone: in a bare sequence the
    "\n" + EOS after the target say where the user's history stops, which the training rows teach
    too (and a model overfits first) but which is not the recommendation being validated."""
    return P.sid_sequence_prompt(history_sids, item_sid)._replace(target=item_sid, ends=False)


VALID_WORDINGS = {"sft": P.sid_next, "compact": P.sid_next_compact, "sequence": _sequence_item_only}


def valid_wording(tasks: Sequence[str]) -> str:
    """The next-SID wording a mixture trains, for its validation loss: upstream's ("sft") unless
    the mixture has only one of the compact tasks."""
    if "sid_next" not in tasks:
        if "sid_sequence" in tasks:
            return "sequence"
        if "sid_next_compact" in tasks:
            return "compact"
    return "sft"


def build_valid_examples(tok, rows: Sequence[Row], max_len: int, wording: str = "sft") -> list[Example]:
    """Validation set (upstream): the next-SID task on the valid split, loss on the target only,
    in the wording the mixture trains (`valid_wording`)."""
    build = VALID_WORDINGS[wording]
    return tokenize_prompts(tok, [build(r.history_sids, r.item_sid) for r in rows], max_len)


def eval_prompt_ids(tok, catalogue: Catalogue | None, rows: Sequence[Row], style: str = "eval") -> list[list[int]]:
    """Token ids of the eval prompts (header and body encoded separately; each ends with the
    tokens of "### Response:\\n"). style "eval" = upstream evaluate.py wording, "sft" = the SFT
    next-SID wording. With a catalogue, every history SID must be one of its SIDs."""
    if style not in P.EVAL_STYLES:
        raise RecError(f"eval.prompt: must be one of {', '.join(P.EVAL_STYLES)}, got {style!r}")
    if catalogue is not None:
        known = catalogue.sid_to_ids
        for r in rows:
            for sid in r.history_sids:
                if sid not in known:
                    raise RecError(f"row of user {r.user_id}: history SID {sid} is not in the catalogue")
    return prompt_token_ids(tok, [P.eval_prompt(r.history_sids, r.item_sid, style) for r in rows])


def eval_prompts(tok, rows: Sequence[Row], style: str = "eval") -> list[list[int]]:
    """DESIGN.md name for `eval_prompt_ids` without the catalogue check."""
    return eval_prompt_ids(tok, None, rows, style)


def left_pad(sequences: Sequence[Sequence[int]], length: int, pad_id: int) -> dict[str, np.ndarray]:
    """Left-pad (and left-truncate) id lists to `length`: input_ids, attention_mask, positions."""
    n = len(sequences)
    ids = np.full((n, length), pad_id, dtype=np.int32)
    mask = np.zeros((n, length), dtype=np.int32)
    for i, seq in enumerate(sequences):
        seq = list(seq)[-length:] if length else []
        if seq:
            ids[i, length - len(seq) :] = seq
            mask[i, length - len(seq) :] = 1
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    return {"input_ids": ids, "attention_mask": mask, "positions": positions}


# ---------------------------------------------------------------------------------------------
# Bucketed batches


def check_buckets(buckets: Sequence[int]) -> list[int]:
    values = [int(b) for b in buckets]
    if not values or any(b <= 0 for b in values) or values != sorted(set(values)):
        raise RecError(f"data.length_buckets: expected increasing positive lengths, got {list(buckets)}")
    return values


def bucket_index(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` tokens (the last one when none does: truncation)."""
    for i, b in enumerate(buckets):
        if length <= b:
            return i
    return len(buckets) - 1


def batches_per_epoch(lengths: Sequence[int], batch_size: int, buckets: Sequence[int]) -> int:
    """Independent of the shuffle: sum over buckets of ceil(members / batch_size)."""
    buckets = check_buckets(buckets)
    counts = np.bincount([bucket_index(n, buckets) for n in lengths], minlength=len(buckets))
    return int(sum(-(-int(c) // batch_size) for c in counts))


@dataclass(frozen=True)
class PlannedBatch:
    length: int  # padded length (a bucket)
    indices: np.ndarray  # [batch_size] example indices
    weights: np.ndarray  # [batch_size] 1.0, or 0.0 for filler rows


def plan_epoch(lengths: Sequence[int], batch_size: int, buckets: Sequence[int], seed: int, epoch: int) -> list[PlannedBatch]:
    """Which examples go in which batch, for one epoch: every example exactly once with weight 1."""
    if batch_size <= 0:
        raise RecError(f"train.batch_size: must be positive, got {batch_size}")
    buckets = check_buckets(buckets)
    if not len(lengths):
        raise RecError("no training examples (empty split or task list)")
    rng = np.random.default_rng([int(seed), int(epoch)])
    which = np.asarray([bucket_index(n, buckets) for n in lengths])
    planned: list[PlannedBatch] = []
    for b, bucket_len in enumerate(buckets):
        members = np.flatnonzero(which == b)
        if members.size == 0:
            continue
        members = members[rng.permutation(members.size)]
        for start in range(0, members.size, batch_size):
            chunk = members[start : start + batch_size]
            weights = np.ones(batch_size, dtype=np.float32)
            if chunk.size < batch_size:
                # Fill with copies of the chunk's own rows (same bucket, so no longer padding);
                # weight 0 keeps them out of the loss.
                filler = np.resize(chunk, batch_size - chunk.size)
                weights[chunk.size :] = 0.0
                chunk = np.concatenate([chunk, filler])
            planned.append(PlannedBatch(bucket_len, chunk, weights))
    order = rng.permutation(len(planned))
    return [planned[i] for i in order]


def collate(examples: Sequence[Example], plan: PlannedBatch, pad_id: int, rows: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Arrays for one planned batch (left padded; over-long examples keep their last tokens).

    `rows` (positions inside the global batch, e.g. `rec.dist.process_rows`) materialises only
    those rows: each process of a multi-host run builds just its part; `row_index` says which. `real_tokens` (a scalar)
    counts the non-pad tokens of weighted rows of the WHOLE batch either way (for throughput).
    """
    lengths = np.minimum([len(examples[i]) for i in plan.indices], plan.length)
    real_tokens = np.int64((lengths * (plan.weights > 0)).sum())
    indices, weights = plan.indices, plan.weights
    row_index = np.arange(len(indices), dtype=np.int32)  # position in the global batch
    if rows is not None:
        indices, weights, row_index = indices[rows], weights[rows], row_index[rows]
    picked = [examples[i] for i in indices]
    batch = left_pad([e.input_ids for e in picked], plan.length, pad_id)
    labels = np.full((len(picked), plan.length), IGNORE, dtype=np.int32)
    for i, e in enumerate(picked):
        kept = e.labels[-plan.length :]
        labels[i, plan.length - kept.shape[0] :] = kept
    batch["labels"] = labels
    batch["weights"] = weights.copy()
    batch["row_index"] = row_index
    batch["real_tokens"] = real_tokens
    return batch


def bucketed_batches(examples: Sequence[Example], batch_size: int, buckets: Sequence[int], seed: int, epoch: int,
                     pad_id: int, start_batch: int = 0, rows: np.ndarray | None = None) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of fixed-shape batches, starting at batch `start_batch` (resume)."""
    plan = plan_epoch([len(e) for e in examples], batch_size, buckets, seed, epoch)
    for planned in plan[start_batch:]:
        yield collate(examples, planned, pad_id, rows)


def batch_stream(examples: Sequence[Example], batch_size: int, buckets: Sequence[int], seed: int, pad_id: int,
                 start: tuple[int, int] = (0, 0), rows: np.ndarray | None = None) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
    """Endless (epoch, batch_index, batch) from position `start` = (epoch, batch_index); the
    position to save after consuming a batch is (epoch, batch_index + 1). The global order
    depends only on (examples, batch_size, buckets, seed), never on the number of processes."""
    epoch, index = start
    lengths = [len(e) for e in examples]
    while True:
        plan = plan_epoch(lengths, batch_size, buckets, seed, epoch)
        for i in range(index, len(plan)):
            yield epoch, i, collate(examples, plan[i], pad_id, rows)
        epoch, index = epoch + 1, 0
