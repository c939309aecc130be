"""Advantage estimators over groups of completions of the same prompt. Pure numpy, host-side.

Rewards come as float[P, G] (P prompts, G completions each). Estimators:
- `grpo`: (R - mean_g R) / (std_g R + eps), std the unbiased (n-1) estimate and eps 1e-4, as
  upstream MiniOneRec/TRL. Groups whose rewards are all equal get 0 (no signal); G = 1 gets 0.
- `rloo`: R - mean of the other G-1 members of the group (leave-one-out baseline); G = 1 gets 0.
"""

from __future__ import annotations

import numpy as np

from rec.errors import RecError

ESTIMATORS = ("grpo", "rloo")


def grpo_advantages(rewards: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    group_size = rewards.shape[1]
    if group_size < 2:
        return np.zeros_like(rewards, dtype=np.float32)
    mean = rewards.mean(axis=1, keepdims=True)
    std = rewards.std(axis=1, ddof=1, keepdims=True)
    return ((rewards - mean) / (std + eps)).astype(np.float32)


def rloo_advantages(rewards: np.ndarray) -> np.ndarray:
    rewards = np.asarray(rewards, dtype=np.float64)
    group_size = rewards.shape[1]
    if group_size < 2:
        return np.zeros_like(rewards, dtype=np.float32)
    others_mean = (rewards.sum(axis=1, keepdims=True) - rewards) / (group_size - 1)
    return (rewards - others_mean).astype(np.float32)


def compute_advantages(rewards: np.ndarray, estimator: str = "grpo", eps: float = 1e-4) -> np.ndarray:
    """float32[P, G] advantages of float[P, G] group rewards."""
    if np.ndim(rewards) != 2:
        raise ValueError(f"rewards must be [prompts, group], got shape {np.shape(rewards)}")
    if estimator == "grpo":
        return grpo_advantages(rewards, eps)
    if estimator == "rloo":
        return rloo_advantages(rewards)
    raise RecError(f"config: advantage estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
