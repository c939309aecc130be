"""`rec grpo`: GRPO post-training of a Qwen2 model on GSM8K (or generated arithmetic problems).

One optimizer step:
1. take the next `train.batch_size` questions (shuffled per epoch; `grpo.synthetic` = N uses N
   generated problems instead of `data.dir`/`data.train_split`.jsonl), prompt each with the
   tokenizer's chat template when it has one, else "Question: ...\\nAnswer:" (rec/data/gsm8k.py);
2. rollouts: `grpo.generations` samples per question with `rec.decode.sampling.generate`
   (temperature, top-p, `grpo.max_new_tokens`), in chunks of `train.micro_batch_size` questions;
3. rewards: correctness of the final number and the "#### N" answer-line format, weighted by
   `grpo.reward_weights` (rec/train/rewards.py); advantages per question group with
   `grpo.estimator` (grpo | rloo);
4. `grpo.updates_per_batch` optimizer steps on the PPO-clip loss (ratio clipped to
   [1 - clip_low, 1 + clip_high]) normalised by the token count of the whole batch, plus
   `grpo.beta` * k3 KL to the initial model when beta > 0. The ratio is taken against the rollout
   policy's log-probs (identically 1 with one update per batch).

Rollout fast paths, ON unless the environment sets the variable to 0 (`rec.config.env_flag`, with
`grpo.fast_generate` / `grpo.fast_decode_attention` = auto | on | off when the variable is unset):
- ROLLOUT_FAST_GENERATE: the decode is one on-device `lax.while_loop` that stops when every row
  has finished (KV cache padded on device); off = a Python loop of jitted one-token steps.
- ROLLOUT_FAST_QWEN2_DECODE_ATTENTION: the decode-step attention specialised for one query token
  (bf16 operands, f32 scores and softmax).
The resolved settings are printed at start and written under `resolved:` in the run's config.yaml.

Eval: greedy decoding on the first `grpo.eval_limit` problems of `grpo.eval_split` every
`grpo.eval_every` steps (0 = only at the end); accuracy and format rate go to metrics.jsonl and
`run_summary.json` (`eval/gsm8k_accuracy`, `eval/gsm8k_format_rate`, `eval/num_samples`).
Checkpoints: `grpo_last` every `checkpoint.every_steps` steps (0 = at each eval) and at the end; resumable
(the sampling RNG lives in the checkpointed train state).
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

from rec.decode.sampling import FAST_ATTENTION_ENV, FAST_GENERATE_ENV
from rec.errors import RecError
from rec.train.advantages import compute_advantages
from rec.train.losses import completion_logprobs, ppo_clip_loss
from rec.train.rewards import gsm8k_rewards
from rec.train.rl import COMPUTE_DTYPES, left_pad_prompts, make_score_fn, step_prompt_indices

log = logging.getLogger("rec.train")

STAGE = "grpo"
LAST_TAG = "grpo_last"


def resolve_fast_paths(cfg) -> dict[str, bool]:
    """The rollout fast-path switches as recorded in config.yaml: the environment variable when
    set (0 = off), else the config setting (auto/on = on); see rec.decode.sampling."""
    from rec.decode.sampling import rollout_fast_paths

    fast_generate, fast_attention = rollout_fast_paths(cfg.grpo.fast_generate, cfg.grpo.fast_decode_attention)
    return {"rollout_fast_generate": fast_generate, "rollout_fast_qwen2_decode_attention": fast_attention}


def check_grpo_config(cfg) -> None:
    g = cfg.grpo
    if g.generations < 2:
        raise RecError(f"config: 'grpo.generations' must be at least 2 (group baselines), got {g.generations}")
    if g.temperature < 0:
        raise RecError(f"config: 'grpo.temperature' must be >= 0, got {g.temperature}")
    if g.max_prompt_len < 8:
        raise RecError(f"config: 'grpo.max_prompt_len' must be at least 8, got {g.max_prompt_len}")
    if g.updates_per_batch < 1:
        raise RecError(f"config: 'grpo.updates_per_batch' must be >= 1, got {g.updates_per_batch}")
    from rec.train.common import check_steps_per_batch  # noqa: PLC0415

    check_steps_per_batch(cfg, "grpo.updates_per_batch", g.updates_per_batch)
    if not 0.0 <= g.clip_low < 1.0 or g.clip_high < 0.0:
        raise RecError(f"config: 'grpo.clip_low' must be in [0, 1) and 'grpo.clip_high' >= 0, got {g.clip_low}, {g.clip_high}")
    if g.beta < 0:
        raise RecError(f"config: 'grpo.beta' must be >= 0, got {g.beta}")
    if g.synthetic < 0 or g.eval_every < 0:
        raise RecError("config: 'grpo.synthetic' and 'grpo.eval_every' must be >= 0")
    if len(g.reward_weights) != 2:
        raise RecError(f"config: 'grpo.reward_weights' needs 2 values (correctness, format), got {g.reward_weights}")
    if not g.synthetic and not cfg.data.dir:
        raise RecError("config: 'data.dir' is empty; set it to a GSM8K directory (train.jsonl, test.jsonl) "
                       "or use grpo.synthetic=N")


def load_problems(cfg):
    """(train problems, eval problems) from data.dir or the generated set."""
    from rec.data.gsm8k import read_gsm8k, synthetic_problems

    g = cfg.grpo
    if g.synthetic:
        train = synthetic_problems(g.synthetic, seed=cfg.run.seed)
        evals = synthetic_problems(max(g.eval_limit, 0), seed=cfg.run.seed + 1) if g.eval_limit else []
        return train, evals
    train = read_gsm8k(cfg.data.dir, cfg.data.train_split, limit=cfg.data.limit)
    evals = read_gsm8k(cfg.data.dir, g.eval_split, limit=g.eval_limit) if g.eval_limit else []
    return train, evals


def prompt_width(lengths: list[int], max_prompt_len: int, multiple: int = 16) -> int:
    """One padded prompt length for the whole run (one compile): the longest prompt rounded up to
    `multiple`, capped at `max_prompt_len` (longer prompts keep their last tokens)."""
    longest = max(lengths)
    return min(max_prompt_len, int(math.ceil(longest / multiple) * multiple))


@dataclass
class _Setup:
    cfg: object
    mesh: object
    shape: object
    tokenizer: object
    train_ids: list
    train_golds: list
    eval_ids: list
    eval_golds: list
    width: int
    pad_id: int
    eos_id: int
    compute_dtype: object
    micro_prompts: int
    fast: dict
    total_steps: int


def _tokenize(tok, problems, max_prompt_len):
    from rec.data.gsm8k import format_prompt

    texts = [format_prompt(tok, p.question) for p in problems]
    if not texts:
        return []
    encoded = tok(texts, add_special_tokens=False)["input_ids"]
    return [list(ids)[-max_prompt_len:] for ids in encoded]


def _prepare(cfg, mesh, fast: dict[str, bool]):
    from rec.dist import batch_divisor
    from rec.train.common import check_eval_batch_divisible, eos_and_pad_ids, load_model_and_tokenizer

    train_problems, eval_problems = load_problems(cfg)
    micro = cfg.train.micro_batch_size or cfg.train.batch_size
    divisor = batch_divisor(mesh)
    if (micro * cfg.grpo.generations) % divisor:
        raise RecError(
            f"config: sequences per rollout/micro-batch ({micro} questions x {cfg.grpo.generations} samples) must "
            f"be a multiple of the {divisor} devices on the batch axes of mesh '{cfg.mesh.shape}'"
        )
    if eval_problems:
        check_eval_batch_divisible(cfg, divisor)
    shape, params, tok = load_model_and_tokenizer(cfg, None, STAGE, mesh=mesh)
    eos_id, pad_id = eos_and_pad_ids(tok, cfg)
    train_ids = _tokenize(tok, train_problems, cfg.grpo.max_prompt_len)
    eval_ids = _tokenize(tok, eval_problems, cfg.grpo.max_prompt_len)
    width = prompt_width([len(t) for t in train_ids + eval_ids], cfg.grpo.max_prompt_len)
    rollouts = max(1, math.ceil(cfg.train.epochs * len(train_ids) / cfg.train.batch_size))
    setup = _Setup(
        cfg=cfg, mesh=mesh, shape=shape, tokenizer=tok, train_ids=train_ids,
        train_golds=[p.answer for p in train_problems], eval_ids=eval_ids,
        eval_golds=[p.answer for p in eval_problems], width=width, pad_id=pad_id, eos_id=eos_id,
        compute_dtype=COMPUTE_DTYPES[cfg.model.compute_dtype], micro_prompts=micro, fast=fast,
        total_steps=cfg.train.steps or rollouts * cfg.grpo.updates_per_batch,  # optimizer steps
    )
    return setup, params


def sample(setup: _Setup, params, prompt_ids, prompt_mask, rng, *, greedy: bool, rows_per_call: int):
    """Completions for left-padded prompts, `rows_per_call` rows per generate call; host arrays
    (ids [R, N], mask [R, N]) on every process."""
    from rec.decode import sampling
    from rec.dist import process_allgather, shard_batch

    g = setup.cfg.grpo
    ids_out, mask_out = [], []
    for call, start in enumerate(range(0, prompt_ids.shape[0], rows_per_call)):
        g_ids, g_mask = shard_batch((prompt_ids[start : start + rows_per_call],
                                     prompt_mask[start : start + rows_per_call]), setup.mesh)
        tokens, mask, _ = sampling.generate(
            params, setup.shape, g_ids, g_mask, jax.random.fold_in(rng, call),
            temperature=g.temperature, top_p=g.top_p, max_new_tokens=g.max_new_tokens, eos_id=setup.eos_id,
            pad_id=setup.pad_id, greedy=greedy, fast_generate=setup.fast["rollout_fast_generate"],
            fast_attention=setup.fast["rollout_fast_qwen2_decode_attention"], compute_dtype=setup.compute_dtype,
        )
        ids_out.append(tokens)
        mask_out.append(mask)
    ids = np.concatenate([np.asarray(process_allgather(t)) for t in ids_out])
    mask = np.concatenate([np.asarray(process_allgather(m)) for m in mask_out])
    return ids, mask


def decode_completions(tok, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """Completion texts (EOS and padding dropped, special tokens skipped)."""
    return [tok.decode([int(t) for t, m in zip(row, row_mask, strict=True) if m], skip_special_tokens=True)
            for row, row_mask in zip(ids, mask, strict=True)]


def evaluate(setup: _Setup, params) -> dict[str, float]:
    """Greedy accuracy and format rate on the eval problems."""
    from rec.train.rewards import correctness_reward, format_reward

    batch = setup.cfg.eval.batch_size
    texts: list[str] = []
    for start in range(0, len(setup.eval_ids), batch):
        chunk = setup.eval_ids[start : start + batch]
        filled = chunk + [chunk[0]] * (batch - len(chunk))  # fixed shape: repeat, then drop
        ids, mask = left_pad_prompts(filled, setup.width, setup.pad_id)
        out_ids, out_mask = sample(setup, params, ids, mask, jax.random.PRNGKey(0), greedy=True, rows_per_call=batch)
        texts += decode_completions(setup.tokenizer, out_ids[: len(chunk)], out_mask[: len(chunk)])
    correct = [correctness_reward(t, g) for t, g in zip(texts, setup.eval_golds, strict=True)]
    formatted = [format_reward(t) for t in texts]
    return {"gsm8k_accuracy": float(np.mean(correct)), "gsm8k_format_rate": float(np.mean(formatted)),
            "num_samples": len(texts)}


def make_loss_fn(shape, compute_dtype, remat: bool, g, clip: bool):
    """PPO-clip loss normalised by the micro-batch token count; the loop's token weights turn the
    accumulated loss into the token mean of the whole batch."""

    def loss_fn(params, mb, extra):
        del extra
        logp = completion_logprobs(params, shape, mb["prompt_ids"], mb["prompt_mask"], mb["completion_ids"],
                                   mb["completion_mask"], compute_dtype=compute_dtype, remat=remat)
        old = mb["old_logp"] if clip else jax.lax.stop_gradient(logp)
        mask = mb["completion_mask"].astype(jnp.float32)
        tokens = mask.sum()
        loss, metrics = ppo_clip_loss(logp, old, mb["advantages"], mask, clip_low=g.clip_low, clip_high=g.clip_high,
                                      total_tokens=tokens, beta=g.beta, ref_logp=mb.get("ref_logp"))
        denom = jnp.maximum(tokens, 1.0)
        aux = {"weight": tokens, "clip_fraction": metrics["clip_sum"] / denom}
        if "kl_sum" in metrics:
            aux["kl"] = metrics["kl_sum"] / denom
        return loss, aux

    return loss_fn


def _meta(setup: _Setup, step: int) -> dict:
    return {"model_config": setup.shape.to_hf_config(setup.cfg.model.param_dtype), "stage": STAGE, "step": int(step)}


def run_grpo(cfg) -> dict:
    """Run GSM8K GRPO as configured; returns the figures merged into run_summary.json."""
    from rec import checkpoint
    from rec.dist import init_distributed, is_primary, make_mesh, shard_batch
    from rec.dist.preemption import PreemptionGuard
    from rec.train.common import (
        check_rollout_memory,
        check_run_dir,
        crossed_multiple,
        prepare_run_dir,
        refuse_sft_only_keys,
        resume_rollout_state,
        save_rollout_last,
    )
    from rec.train.logging import MetricsLogger, merge_run_summary
    from rec.train.step import make_train_step
    from rec.train.optim import make_optimizer
    from rec.train.state import init_state, state_shardings

    refuse_sft_only_keys(cfg, "grpo")
    check_run_dir(cfg, LAST_TAG, "GRPO")
    check_grpo_config(cfg)
    init_distributed()
    fast = resolve_fast_paths(cfg)
    if is_primary():
        def on_off(flag: bool) -> str:
            return "on" if flag else "off"

        print(f"grpo: rollout fast paths: {FAST_GENERATE_ENV}={on_off(fast['rollout_fast_generate'])}, "
              f"{FAST_ATTENTION_ENV}={on_off(fast['rollout_fast_qwen2_decode_attention'])}", file=sys.stderr)
    mesh = make_mesh(cfg.mesh.shape)
    setup, params = _prepare(cfg, mesh, fast)
    g = cfg.grpo
    group = g.generations
    prompts_per_step = cfg.train.batch_size
    num_micro = prompts_per_step // setup.micro_prompts
    clip = g.updates_per_batch > 1

    optimizer = make_optimizer(cfg.train, setup.total_steps)
    param_sh = jax.tree.map(lambda p: p.sharding, params)
    shardings = state_shardings(params, param_sh, optimizer.tx, mesh)
    state = init_state(params, optimizer.tx, cfg.run.seed, mesh)
    ref_params = None
    if g.beta > 0:
        ref_params = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=param_sh)(params)
    del params

    state, ref_params, meta = resume_rollout_state(cfg, LAST_TAG, state, ref_params, optimizer.tx, mesh)
    if meta is not None:
        if is_primary():
            print(f"grpo: resuming from {LAST_TAG} step {int(state.step)}", file=sys.stderr)

    check_rollout_memory(cfg, state, setup.shape, mesh, setup.micro_prompts, group, setup.width + g.max_new_tokens,
                         ref_params=ref_params)
    prepare_run_dir(cfg, STAGE, extra={**setup.fast, "total_steps": setup.total_steps,
                                       "num_problems": len(setup.train_ids), "prompt_width": setup.width},
                    tokenizer=setup.tokenizer)
    if is_primary():
        print(f"grpo: {len(setup.train_ids)} problems, {setup.total_steps} steps of {prompts_per_step} questions x "
              f"{group} samples, estimator {g.estimator}", file=sys.stderr)

    loss_fn = make_loss_fn(setup.shape, setup.compute_dtype, cfg.model.remat, g, clip)
    train_step = make_train_step(loss_fn, optimizer, num_micro=num_micro, state_shardings=shardings, mesh=mesh)
    score_fn = make_score_fn(setup.shape, setup.compute_dtype, num_micro)
    logger = MetricsLogger(cfg.run.dir, STAGE, cfg, total_steps=setup.total_steps, initial_step=int(state.step))
    eval_every = g.eval_every or setup.total_steps
    save_every = cfg.checkpoint.every_steps or eval_every
    writer = checkpoint.Checkpointer(cfg.run.dir, async_save=cfg.checkpoint.async_save)
    last_eval: dict[str, float] = {}
    last_metrics: dict[str, float] = {}
    step = int(state.step)
    guard = PreemptionGuard()
    try:
        while step < setup.total_steps:
            t0 = time.perf_counter()
            indices = step_prompt_indices(step // g.updates_per_batch, prompts_per_step, len(setup.train_ids),
                                          cfg.run.seed)
            ids, mask = left_pad_prompts([setup.train_ids[i] for i in indices], setup.width, setup.pad_id)
            ids, mask = np.repeat(ids, group, axis=0), np.repeat(mask, group, axis=0)
            state, rng = state.split_rng()
            comp_ids, comp_mask = sample(setup, state.params, ids, mask, rng, greedy=False,
                                         rows_per_call=setup.micro_prompts * group)
            t_rollout = time.perf_counter() - t0
            texts = decode_completions(setup.tokenizer, comp_ids, comp_mask)
            golds = [setup.train_golds[i] for i in indices for _ in range(group)]
            total, terms = gsm8k_rewards(texts, golds, g.reward_weights)
            advantages = compute_advantages(total.reshape(prompts_per_step, group), g.estimator).reshape(-1)
            batch = shard_batch({
                "prompt_ids": ids, "prompt_mask": mask, "completion_ids": comp_ids, "completion_mask": comp_mask,
                "advantages": advantages.astype(np.float32),
            }, mesh)
            if clip:
                batch["old_logp"] = score_fn(state.params, batch)
            if ref_params is not None:
                batch["ref_logp"] = score_fn(ref_params, batch)
            t1 = time.perf_counter()
            for _ in range(g.updates_per_batch):
                state, metrics = train_step(state, batch)
                step += 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            t_update = time.perf_counter() - t1

            lengths = comp_mask.sum(axis=1)
            generated = int(lengths.sum())
            grouped = total.reshape(prompts_per_step, group)
            last_metrics = {
                "reward": float(total.mean()), "reward_std": float(grouped.std(axis=1, ddof=1).mean()),
                **{f"rewards/{k}_mean": float(v.mean()) for k, v in terms.items()},
                "advantage_std": float(advantages.std()), "completion_length": float(lengths.mean()),
                "completion_length_max": int(lengths.max()), "loss": metrics["loss"],
                "grad_norm": metrics["grad_norm"], "lr": metrics["lr"], "clip_fraction": metrics["clip_fraction"],
                "rollout_s": t_rollout, "update_s": t_update, "step_s": time.perf_counter() - t0,
                "rollout_tokens_per_s": generated / max(t_rollout, 1e-9),
            }
            if "kl" in metrics:
                last_metrics["kl"] = metrics["kl"]
            do_eval = bool(setup.eval_ids) and (crossed_multiple(step, g.updates_per_batch, eval_every)
                                                or step == setup.total_steps)
            if do_eval:
                t2 = time.perf_counter()
                last_eval = evaluate(setup, state.params)
                last_metrics.update({f"eval/{k}": v for k, v in last_eval.items()})
                last_metrics["eval_s"] = time.perf_counter() - t2
            logger.log(step, last_metrics)
            save_rollout_last(cfg, LAST_TAG, writer, logger, guard, step, g.updates_per_batch, setup.total_steps,
                              save_every, state, ref_params, _meta(setup, step))
    finally:
        guard.close()
        writer.close()
        logger.close()

    figures = {"train/grpo_steps": step, **{f"train/grpo_{k}": v for k, v in setup.fast.items()}}
    if last_metrics:
        figures.update({"train/grpo_reward": last_metrics["reward"],
                        "train/grpo_correctness": last_metrics["rewards/correctness_mean"]})
    if last_eval:
        figures.update({"eval/gsm8k_accuracy": last_eval["gsm8k_accuracy"],
                        "eval/gsm8k_format_rate": last_eval["gsm8k_format_rate"],
                        "eval/num_samples": last_eval["num_samples"]})
    merge_run_summary(cfg.run.dir, figures)
    if is_primary():
        print(f"grpo: done at step {step}; " + json.dumps({k: v for k, v in figures.items() if k.startswith("eval/")}),
              file=sys.stderr)
    return figures


# ---------------------------------------------------------------------------------------------
# rec bench rollout


def bench_rollout(args) -> dict:
    """Tokens/s of GRPO-style sampling rollouts on random weights of `--shape` (Qwen2.5 vocabulary):
    `--batch` sequences (default 128) of `--prompt-len` prompt tokens, `--gen-len` sampled tokens
    at temperature 1. `--fast on|off` sets both rollout fast paths (auto = the environment
    variables, on when unset). Random weights almost never sample EOS, so every row generates
    `--gen-len` tokens. One warm-up call (compile_s), then `--iters` timed calls."""
    from rec import dist
    from rec.bench import QWEN_BASE_VOCAB, QWEN_EOS_ID, device_facts, random_params, require_batch_divisible
    from rec.decode import sampling
    from rec.model.qwen2 import get_shape, shape_with_vocab

    batch = args.batch or 128
    iters = max(1, args.iters)
    if args.prompt_len < 1 or args.gen_len < 1:
        raise RecError(f"bench rollout: --prompt-len and --gen-len must be positive, got {args.prompt_len}, {args.gen_len}")
    shape = get_shape(args.shape, "--shape")
    if args.shape == "tiny":
        shape = shape_with_vocab(shape, QWEN_BASE_VOCAB)
    mesh = dist.make_mesh("auto")
    require_batch_divisible(batch, mesh)
    if args.fast == "auto":
        fast_generate, fast_attention = sampling.rollout_fast_paths("auto", "auto")
    else:
        fast_generate = fast_attention = args.fast == "on"
    dtype = COMPUTE_DTYPES[args.dtype]
    params = random_params(shape, dtype, mesh)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, QWEN_EOS_ID - 1, size=(batch, args.prompt_len)).astype(np.int32)
    g_ids, g_mask = dist.shard_batch((ids, np.ones_like(ids)), mesh)

    def call(i):
        _, _, lengths = sampling.generate(
            params, shape, g_ids, g_mask, jax.random.PRNGKey(i), temperature=1.0, top_p=1.0,
            max_new_tokens=args.gen_len, eos_id=QWEN_EOS_ID, pad_id=QWEN_EOS_ID, fast_generate=fast_generate,
            fast_attention=fast_attention, compute_dtype=dtype,
        )
        return int(np.asarray(dist.process_allgather(lengths)).sum())

    start = time.perf_counter()
    call(0)
    compile_s = time.perf_counter() - start
    generated = 0
    start = time.perf_counter()
    for i in range(1, iters + 1):
        generated += call(i)
    elapsed = time.perf_counter() - start
    return {
        "bench": "rollout",
        "shape": args.shape,
        "batch_size": batch,
        "prompt_len": args.prompt_len,
        "gen_len": args.gen_len,
        "iters": iters,
        "tokens_per_s": round(generated / elapsed, 1),
        "seconds_per_call": round(elapsed / iters, 4),
        "generated_tokens_per_call": generated // iters,
        "compile_s": round(compile_s, 2),
        "fast_generate": fast_generate,
        "fast_decode_attention": fast_attention,
        "dtype": args.dtype,
        **device_facts(),
    }
