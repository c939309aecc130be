"""Reward functions for recommendation RL (`rec rl`) and GSM8K GRPO (`rec grpo`). Pure, host-side.

Recommendation (upstream MiniOneRec, reference/minionerec-upstream.md §6.3). A prompt's group is its
G beam completions in beam-score order (rank r = 0 is the best beam); `hits[p, r]` says whether
completion r of prompt p equals the prompt's own target SID.

- `rule`: 1 for a hit, 0 otherwise.
- `ranking_only`: the rank penalty. With w_r = (1/log2(r+2)) / sum_j 1/log2(j+2) (the w_r sum to
  1 over the G ranks), a miss at rank r gets -w_r when the group has a hit somewhere; hits get 0;
  groups without any hit get 0 everywhere (they carry no signal).
- `ranking` (default) = the weighted sum of `rule` and `ranking_only`.
Upstream compares strings after stripping newline and quote characters (and spaces for `rule`);
we strip the same set for both terms, which is identical for trie-constrained completions.

GSM8K (format documented in rec/data/gsm8k.py):
- `correctness`: 1 when the completion's final number (after the last "####", else the last
  number in the text) equals the gold answer, else 0.
- `format`: 1 when the last non-empty line of the completion is "#### <number>" and "####"
  occurs exactly once, else 0.
Default weights (grpo.reward_weights) are [1.0, 0.5].
"""

from __future__ import annotations

import math
import re

import numpy as np

from rec.data.gsm8k import ANSWER_MARK, extract_final_number, numbers_equal, parse_number
from rec.errors import RecError

# ----------------------------------------------------------------------------------------------
# Recommendation

REC_REWARD_TERMS = {
    "rule": ("rule",),
    "ranking_only": ("ranking_only",),
    "ranking": ("rule", "ranking_only"),
}


def normalize_sid(text: str) -> str:
    return text.strip("\n\" ")


def sid_hits(completions: list[list[str]], targets: list[str]) -> np.ndarray:
    """bool[P, G]: completion g of prompt p equals that prompt's target (after normalising)."""
    if len(completions) != len(targets):
        raise ValueError(f"{len(completions)} completion groups for {len(targets)} targets")
    return np.array(
        [[normalize_sid(c) == normalize_sid(t) for c in group] for group, t in zip(completions, targets, strict=True)],
        dtype=bool,
    ).reshape(len(targets), -1)


def rank_weights(group_size: int) -> np.ndarray:
    """w_r = (1/log2(r+2)) / sum_{j<G} 1/log2(j+2), r = 0..G-1 (sums to 1)."""
    discounts = np.array([1.0 / math.log2(r + 2) for r in range(group_size)], dtype=np.float64)
    return discounts / discounts.sum()


def rule_reward(hits: np.ndarray) -> np.ndarray:
    """float[P, G]: 1.0 for a hit."""
    return hits.astype(np.float32)


def ranking_only_reward(hits: np.ndarray) -> np.ndarray:
    """float[P, G]: -w_rank for misses in groups that contain a hit, 0 elsewhere."""
    weights = rank_weights(hits.shape[1])[None, :]
    group_has_hit = hits.any(axis=1, keepdims=True)
    return np.where(group_has_hit & ~hits, -weights, 0.0).astype(np.float32)


_REC_FUNCTIONS = {"rule": rule_reward, "ranking_only": ranking_only_reward}


def resolve_weights(names: tuple[str, ...], weights: list[float], key: str) -> list[float]:
    """One weight per reward term ([] = all 1.0); a wrong count is a RecError naming `key`."""
    if not weights:
        return [1.0] * len(names)
    if len(weights) != len(names):
        raise RecError(
            f"config: '{key}' has {len(weights)} value(s) but the reward has {len(names)} term(s) "
            f"({', '.join(names)})"
        )
    return [float(w) for w in weights]


def recommendation_rewards(
    hits: np.ndarray, reward: str = "ranking", weights: list[float] | None = None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Total reward float[P, G] and each term's (unweighted) reward by name."""
    if reward not in REC_REWARD_TERMS:
        raise RecError(f"config: 'rl.reward' must be one of {', '.join(REC_REWARD_TERMS)}, got {reward!r}")
    names = REC_REWARD_TERMS[reward]
    resolved = resolve_weights(names, list(weights or []), "rl.reward_weights")
    terms = {name: _REC_FUNCTIONS[name](hits) for name in names}
    total = np.zeros(hits.shape, dtype=np.float32)
    for name, weight in zip(names, resolved, strict=True):
        total += weight * terms[name]
    return total, terms


# ----------------------------------------------------------------------------------------------
# GSM8K

GSM8K_REWARD_TERMS = ("correctness", "format")

_ANSWER_LINE_RE = re.compile(r"^\s*####\s*(.+?)\s*$")


def correctness_reward(completion: str, gold: float) -> float:
    predicted = extract_final_number(completion)
    return 1.0 if predicted is not None and numbers_equal(predicted, gold) else 0.0


def format_reward(completion: str) -> float:
    if completion.count(ANSWER_MARK) != 1:
        return 0.0
    lines = [line for line in completion.splitlines() if line.strip()]
    if not lines:
        return 0.0
    match = _ANSWER_LINE_RE.match(lines[-1])
    return 1.0 if match and parse_number(match.group(1)) is not None else 0.0


def gsm8k_rewards(
    completions: list[str], golds: list[float], weights: list[float]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Total reward float[N] (weighted sum) and each term's reward by name, for N completions."""
    if len(completions) != len(golds):
        raise ValueError(f"{len(completions)} completions for {len(golds)} gold answers")
    resolved = resolve_weights(GSM8K_REWARD_TERMS, list(weights), "grpo.reward_weights")
    terms = {
        "correctness": np.array([correctness_reward(c, g) for c, g in zip(completions, golds, strict=True)], dtype=np.float32),
        "format": np.array([format_reward(c) for c in completions], dtype=np.float32),
    }
    total = np.zeros(len(completions), dtype=np.float32)
    for name, weight in zip(GSM8K_REWARD_TERMS, resolved, strict=True):
        total += weight * terms[name]
    return total, terms
