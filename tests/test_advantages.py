"""Advantage estimators against hand-computed values and torch's unbiased std."""

import numpy as np
import pytest
import torch

from rec.errors import RecError
from rec.train.advantages import compute_advantages


def test_grpo_by_hand():
    # mean 0.25; unbiased std sqrt((0.5625 + 3 * 0.0625) / 3) = 0.5
    adv = compute_advantages(np.array([[1.0, 0.0, 0.0, 0.0], [2.0, 2.0, 2.0, 2.0]]), "grpo")
    np.testing.assert_allclose(adv[0], [0.75 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001, -0.25 / 0.5001], rtol=1e-6)
    np.testing.assert_array_equal(adv[1], 0.0)  # equal rewards carry no signal


def test_grpo_matches_torch_reference():
    rewards = np.random.default_rng(0).normal(size=(5, 16))
    t = torch.tensor(rewards)
    expected = (t - t.mean(1, keepdim=True)) / (t.std(1, keepdim=True) + 1e-4)
    np.testing.assert_allclose(compute_advantages(rewards, "grpo"), expected.numpy(), rtol=1e-5, atol=1e-6)


def test_rloo_by_hand():
    adv = compute_advantages(np.array([[1.0, 0.0, 0.0, 0.0], [3.0, 1.0, 2.0, 2.0]]), "rloo")
    np.testing.assert_allclose(adv[0], [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)
    np.testing.assert_allclose(adv[1], [3 - 5 / 3, 1 - 7 / 3, 0.0, 0.0], rtol=1e-6, atol=1e-7)


def test_single_member_groups_get_zero_and_bad_estimator():
    np.testing.assert_array_equal(compute_advantages(np.array([[1.0], [0.0]]), "grpo"), 0.0)
    np.testing.assert_array_equal(compute_advantages(np.array([[1.0], [0.0]]), "rloo"), 0.0)
    with pytest.raises(RecError, match="estimator"):
        compute_advantages(np.zeros((1, 2)), "ppo")
