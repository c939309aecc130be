"""RL prompt sets (reference §6.1): body-only prompts, each carrying its own target SID.

Tasks (`rl.tasks`):
- `sid_next` (upstream SidDataset): one prompt per row, SID history -> next SID.
- `title2sid` (upstream RLTitle2SidDataset): one prompt per distinct title and one per distinct
  description (the first paragraph of an upstream list-string description), -> the item's SID.
  Empty descriptions are skipped.
- `seq_title2sid` (upstream RLSeqTitle2SidDataset): title history -> next SID on a sample of
  `seq_title_sample` rows, drawn as pandas' `DataFrame.sample(n, random_state=seed)` draws them.

Fixes relative to upstream (deliberate, documented):
- **B7**: upstream looks the target up through `prompt -> history string -> target` dicts, so rows
  sharing a history (3-5% of rows; including valid rows merged last) all get one row's target.
  Here every prompt carries the target of the row it was built from.
- **B1**: title/description prompts end at "### Response:\\n" (upstream appends the answer).

Prompts are returned in task order, not shuffled; the RL loop shuffles per epoch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

from rec.data import prompts as P
from rec.data.dataset import Catalogue, Row
from rec.errors import RecError


class RLPrompt(NamedTuple):
    text: str  # body only; ends with "### Response:\n"
    target_sid: str  # the SID string the rollout should produce (no trailing "\n")
    task: str


def _first_description(raw: str) -> str:
    """Upstream: a description written as "['p1', ...]" becomes its first paragraph; other text
    is used as is."""
    from rec.data.dataset import description_paragraphs  # noqa: PLC0415

    text = raw.strip()
    if text.startswith("['") and text.endswith("']"):
        paragraphs = description_paragraphs(text)
        return paragraphs[0] if paragraphs else ""
    return raw


def pandas_sample_order(n_rows: int, n_sample: int, seed: int) -> np.ndarray:
    """Row positions `DataFrame.sample(n_sample, random_state=seed)` returns (it draws with a
    legacy RandomState: the first n of a permutation)."""
    return np.random.RandomState(seed).permutation(n_rows)[:n_sample]


def rl_prompts(catalogue: Catalogue, rows: Sequence[Row], tasks: Sequence[str], sample_seed: int = 0,
               seq_title_sample: int = 10000) -> list[RLPrompt]:
    """The RL prompts of `tasks`, in task order. seq_title2sid keeps `seq_title_sample` rows drawn as
    upstream draws them (pandas' sample with random_state=`sample_seed`; upstream leaves it at its
    default 0, independent of the run's seed)."""
    unknown = [t for t in tasks if t not in P.RL_TASKS]
    if unknown:
        raise RecError(f"rl.tasks: unknown task '{unknown[0]}' (known: {', '.join(P.RL_TASKS)})")
    out: list[RLPrompt] = []

    def add(prompt: P.Prompt) -> None:
        out.append(RLPrompt(prompt.body, prompt.target[:-1], prompt.task))

    for task in tasks:
        if task == "sid_next":
            for r in rows:
                add(P.rl_sid_next(r.history_sids, r.item_sid))
        elif task == "sid_next_compact":
            for r in rows:
                add(P.sid_next_compact(r.history_sids, r.item_sid))
        elif task == "sid_sequence":
            for r in rows:
                add(P.sid_sequence_prompt(r.history_sids, r.item_sid))
        elif task == "title2sid":
            # As upstream: dicts over items in id order (last item wins, first fixes the position).
            title_to_sid: dict[str, str] = {}
            description_to_sid: dict[str, str] = {}
            for item_id, (sid, title) in enumerate(zip(catalogue.sids, catalogue.titles, strict=True)):
                title_to_sid[title] = sid
                description = _first_description(catalogue.descriptions[item_id])
                if description.strip():
                    description_to_sid[description] = sid
            for title, sid in title_to_sid.items():
                add(P.rl_title_to_sid(title, sid))
            for description, sid in description_to_sid.items():
                add(P.rl_description_to_sid(description, sid))
        elif task == "seq_title2sid":
            if 0 < seq_title_sample < len(rows):
                chosen = [rows[i] for i in pandas_sample_order(len(rows), seq_title_sample, sample_seed)]
            else:
                chosen = list(rows)
            for r in chosen:
                add(P.rl_seq_title_to_sid(r.history_titles, r.item_sid))
    return out


def rl_prompt_ids(tok, prompt_list: Sequence[RLPrompt], max_prompt_len: int = 512) -> list[list[int]]:
    """Token ids per prompt (no specials), keeping the last `max_prompt_len` tokens (TRL default)."""
    if not prompt_list:
        return []
    encoded = tok([p.text for p in prompt_list], add_special_tokens=False)["input_ids"]
    return [list(ids)[-max_prompt_len:] for ids in encoded]
