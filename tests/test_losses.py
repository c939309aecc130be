"""Policy losses: k3 KL on known values; loss values and gradients against an independent torch
implementation of the upstream (TRL GRPO) loss and against finite differences."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rec.train.losses import k3_kl, ppo_clip_loss, rec_policy_loss, sequence_mean, token_logprobs


def test_k3_kl_known_values():
    logp = jnp.log(jnp.array([0.5, 0.25, 0.3]))
    ref = jnp.log(jnp.array([0.25, 0.25, 0.6]))
    # exp(d) - d - 1 with d = ref - logp: d = -log 2, 0, log 2
    expected = [0.5 + math.log(2) - 1, 0.0, 2 - math.log(2) - 1]
    np.testing.assert_allclose(k3_kl(logp, ref), expected, rtol=1e-6, atol=1e-7)


def test_sequence_mean_masks():
    values = jnp.array([[1.0, 2.0, 100.0], [5.0, 100.0, 100.0], [7.0, 7.0, 7.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    np.testing.assert_allclose(sequence_mean(values, mask), [1.5, 5.0, 0.0])


def _random_case(seed, batch=4, steps=5, vocab=11):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(batch, steps, vocab)).astype(np.float32)
    ref_logits = (logits + 0.3 * rng.normal(size=logits.shape)).astype(np.float32)
    targets = rng.integers(0, vocab, size=(batch, steps))
    mask = np.ones((batch, steps), np.float32)
    mask[1, steps - 2 :] = 0  # a shorter completion
    mask[batch - 1, 1:] = 0  # a one-token completion
    adv = rng.normal(size=(batch,)).astype(np.float32)
    return logits, ref_logits, targets, mask, adv


def _torch_upstream_loss(logits, ref_logits, targets, mask, adv, beta):
    """TRL GRPOTrainer.compute_loss (no dapo/gspo), written from its description."""
    logp = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    ref = torch.log_softmax(ref_logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    kl = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = -(torch.exp(logp - logp.detach()) * adv[:, None] - beta * kl)
    return ((per_token * mask).sum(1) / mask.sum(1)).mean()


def test_rec_policy_loss_matches_torch_value_and_gradient():
    logits, ref_logits, targets, mask, adv = _random_case(0)
    beta = 0.04

    def jax_loss(lg):
        logp = token_logprobs(lg, jnp.asarray(targets))
        ref = token_logprobs(jnp.asarray(ref_logits), jnp.asarray(targets))
        return rec_policy_loss(logp, ref, jnp.asarray(adv), jnp.asarray(mask), beta=beta)[0]

    loss, grad = jax.value_and_grad(jax_loss)(jnp.asarray(logits))
    t_logits = torch.tensor(logits, dtype=torch.float64, requires_grad=True)
    t_loss = _torch_upstream_loss(
        t_logits, torch.tensor(ref_logits, dtype=torch.float64), torch.tensor(targets),
        torch.tensor(mask, dtype=torch.float64), torch.tensor(adv, dtype=torch.float64), beta,
    )
    t_loss.backward()
    assert float(loss) == pytest.approx(t_loss.item(), rel=1e-5, abs=1e-6)
    np.testing.assert_allclose(grad, t_logits.grad.numpy(), rtol=1e-4, atol=1e-6)
    # masked tokens get no gradient
    assert np.abs(np.asarray(grad)[3, 1:]).max() == 0.0 and np.abs(np.asarray(grad)[1, 3:]).max() == 0.0


def test_rec_policy_loss_gradient_finite_difference():
    logits, ref_logits, targets, mask, adv = _random_case(1, batch=2, steps=3, vocab=5)
    old = np.asarray(token_logprobs(jnp.asarray(logits + 0.2), jnp.asarray(targets)))
    ref = token_logprobs(jnp.asarray(ref_logits), jnp.asarray(targets))

    def loss(lg, clip):
        logp = token_logprobs(lg, jnp.asarray(targets))
        old_logp = jnp.asarray(old) if clip else None
        return rec_policy_loss(logp, ref, jnp.asarray(adv), jnp.asarray(mask), beta=0.5, old_logp=old_logp)[0]

    def surrogate_with_logp(lg):
        # ratio = exp(logp - sg(logp)) has value 1 but gradient grad(logp): the loss's gradient equals
        # that of this A * logp form, which finite differences can see.
        logp = token_logprobs(lg, jnp.asarray(targets))
        d = ref - logp
        per_token = -(logp * jnp.asarray(adv)[:, None] - 0.5 * (jnp.exp(d) - d - 1))
        return sequence_mean(per_token, jnp.asarray(mask)).mean()

    for clip in (False, True):
        grad = np.asarray(jax.jit(jax.grad(lambda lg, clip=clip: loss(lg, clip)))(jnp.asarray(logits)))
        numeric_fn = jax.jit(lambda lg, clip=clip: loss(lg, clip)) if clip else jax.jit(surrogate_with_logp)
        h = 1e-2
        for idx in [(0, 0, 1), (0, 2, 4), (1, 1, 0)]:
            plus, minus = logits.copy(), logits.copy()
            plus[idx] += h
            minus[idx] -= h
            numeric = (float(numeric_fn(jnp.asarray(plus))) - float(numeric_fn(jnp.asarray(minus)))) / (2 * h)
            assert grad[idx] == pytest.approx(numeric, rel=2e-2, abs=2e-4), (clip, idx)


def test_rec_policy_loss_one_update_equals_unclipped_ratio_one():
    logits, ref_logits, targets, mask, adv = _random_case(2)
    logp = token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    ref = token_logprobs(jnp.asarray(ref_logits), jnp.asarray(targets))
    a = rec_policy_loss(logp, ref, jnp.asarray(adv), jnp.asarray(mask), beta=0.1)
    b = rec_policy_loss(logp, ref, jnp.asarray(adv), jnp.asarray(mask), beta=0.1, old_logp=logp)
    assert float(a[0]) == pytest.approx(float(b[0]), rel=1e-6)
    assert float(b[1]["clip_fraction"]) == 0.0
    # padding rows (weight 0) do not change the loss
    w = jnp.array([1.0, 1.0, 0.0, 1.0])
    c = rec_policy_loss(logp, ref, jnp.asarray(adv), jnp.asarray(mask), beta=0.1, seq_weights=w)
    keep = jnp.array([0, 1, 3])
    d = rec_policy_loss(logp[keep], ref[keep], jnp.asarray(adv)[keep], jnp.asarray(mask)[keep], beta=0.1)
    assert float(c[0]) == pytest.approx(float(d[0]), rel=1e-6)


def test_ppo_clip_loss_by_hand():
    # one sequence, two tokens; A = 1 and A = -1 in two sequences
    logp = jnp.log(jnp.array([[0.6, 0.3], [0.6, 0.3]]))
    old = jnp.log(jnp.array([[0.4, 0.3], [0.4, 0.5]]))
    adv = jnp.array([1.0, -1.0])
    mask = jnp.array([[1, 1], [1, 1]])
    # ratios: seq0 = [1.5, 1.0], seq1 = [1.5, 0.6]
    # seq0 (A=1): min(1.5, 1.3) = 1.3; min(1, 1) = 1  -> -(1.3 + 1.0)
    # seq1 (A=-1): min(-1.5, -1.3) = -1.5; min(-0.6, -0.8) = -0.8 -> +(1.5 + 0.8)
    loss, metrics = ppo_clip_loss(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, total_tokens=4)
    assert float(loss) == pytest.approx((-(1.3 + 1.0) + (1.5 + 0.8)) / 4, abs=1e-6)
    assert float(metrics["clip_sum"]) == 2.0  # seq0 token 0 and seq1 token 1


def test_ppo_clip_loss_micro_batches_add_up_to_token_mean():
    logits, ref_logits, targets, mask, adv = _random_case(3)
    logp = token_logprobs(jnp.asarray(logits), jnp.asarray(targets))
    old = logp + 0.1
    mask = jnp.asarray(mask)
    total = mask.sum()
    whole, _ = ppo_clip_loss(logp, old, jnp.asarray(adv), mask, clip_low=0.2, clip_high=0.3, total_tokens=total)
    parts = sum(
        float(ppo_clip_loss(logp[s], old[s], jnp.asarray(adv)[s], mask[s], clip_low=0.2, clip_high=0.3,
                            total_tokens=total)[0])
        for s in (slice(0, 2), slice(2, 4))
    )
    assert float(whole) == pytest.approx(parts, rel=1e-6)
    # with the ratio at 1 the loss is minus the token-weighted mean advantage
    at_one, _ = ppo_clip_loss(logp, logp, jnp.asarray(adv), mask, clip_low=0.2, clip_high=0.3, total_tokens=total)
    expected = -(np.asarray(mask).sum(1) * adv).sum() / float(total)
    assert float(at_one) == pytest.approx(expected, rel=1e-5)


def test_completion_logprobs_match_unpadded_full_forward():
    """Left-padded prompt + right-padded completion, chunked: equals log-softmax of the model's
    full logits on each row's unpadded sequence."""
    from rec.model.qwen2 import SHAPES, forward, init_params, shape_with_vocab
    from rec.train.losses import completion_logprobs

    shape = shape_with_vocab(SHAPES["tiny"], 50)
    params = init_params(shape, jax.random.PRNGKey(0), vocab_multiple=64)  # padded vocab rows
    params = jax.tree.map(lambda p: p * 10 if p.ndim >= 2 else p, params)  # sharper distributions
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 50, size=n).tolist() for n in (4, 6)]
    completions = [rng.integers(1, 50, size=n).tolist() for n in (5, 3)]
    T, N = 6, 5
    prompt_ids = np.zeros((2, T), np.int32)
    prompt_mask = np.zeros((2, T), np.int32)
    comp_ids = np.zeros((2, N), np.int32)
    comp_mask = np.zeros((2, N), np.int32)
    for i, (p, c) in enumerate(zip(prompts, completions, strict=False)):
        prompt_ids[i, T - len(p):] = p
        prompt_mask[i, T - len(p):] = 1
        comp_ids[i, : len(c)] = c
        comp_mask[i, : len(c)] = 1
    got = jax.jit(lambda *a: completion_logprobs(params, shape, *a, compute_dtype=jnp.float32, chunk=2))(
        jnp.asarray(prompt_ids), jnp.asarray(prompt_mask), jnp.asarray(comp_ids), jnp.asarray(comp_mask))
    full_forward = jax.jit(lambda seq: forward(params, shape, seq, jnp.arange(seq.shape[1])[None],
                                               jnp.ones_like(seq), compute_dtype=jnp.float32)[0])
    for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
        logits = full_forward(jnp.asarray([p + c]))
        logp = jax.nn.log_softmax(logits[0, :, : shape.vocab_size], axis=-1)
        expected = [float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(c)]
        np.testing.assert_allclose(np.asarray(got)[i, : len(c)], expected, rtol=1e-4, atol=1e-4)
        assert np.all(np.asarray(got)[i, len(c):] == 0.0)
