"""`rec bench eval|sft|rollout|rl`: measure speed on random weights; print ONE JSON object.

`eval` times `constrained_beam_search` the way `rec eval` runs it, at a named model shape
(`--shape`, rec.model SHAPES) with the vocabulary of Qwen2.5 (151,665 tokens) plus the dataset's
SID tokens, whose ids follow 151,665 in sorted string order as upstream assigns them. No real
tokenizer is needed (none is reachable offline): prompts are upstream eval prompts built from the
`--data` directory's valid split, and their token COUNTS are estimated with the Qwen2 pre-tokenizer
rule (one token per pre-token piece, one per SID token; exact for common English words, a slight
underestimate for rare ones). Token VALUES are random non-special ids except the SID tokens, which
are real: speed does not depend on which ids are fed. Batches are padded to one length (one
compile), `--iters` timed calls follow a warm-up call (whose time is reported as `compile_s`).

`sft` times the SFT train step (forward + backward + AdamW) at `--batch` x `--seq-len` tokens.
`rollout` / `rl` delegate to `bench_rollout(args)` / `bench_rl(args)` in rec.train.grpo / rec.train.rl.

Utilisation: model FLOPs (rec.model.qwen2.flops_per_token, PaLM accounting) divided by the time and
the device's dense bf16 peak (known accelerators only; absent on CPU).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import time

import numpy as np

from rec.errors import RecError

QWEN_BASE_VOCAB = 151_665  # len(Qwen2.5 tokenizer) before the SID tokens
QWEN_NEWLINE_ID = 198  # "\n" (Ċ)
QWEN_EOS_ID = 151_645  # <|im_end|>
# Qwen2's pre-tokenizer split pattern (tokenizer.json of Qwen2.5).
QWEN2_PRETOKENIZE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SID_TOKEN = r"<[a-z]_\d+>"

# Dense bf16 peak FLOP/s per device, by jax device_kind prefix (vendor figures).
PEAK_BF16_FLOPS = {
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v4": 275e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,
    "NVIDIA A100": 312e12,
}


# ---------------------------------------------------------------------------------------------
# Pure helpers


def text_pieces(text: str) -> list[tuple[str, bool]]:
    """Split text at SID tokens (added tokens are matched before BPE): [(piece, is_sid_token)]."""
    import regex

    pieces: list[tuple[str, bool]] = []
    position = 0
    for match in regex.finditer(SID_TOKEN, text):
        if match.start() > position:
            pieces.append((text[position : match.start()], False))
        pieces.append((match.group(0), True))
        position = match.end()
    if position < len(text):
        pieces.append((text[position:], False))
    return pieces


def estimate_qwen_tokens(text: str) -> int:
    """Qwen2.5 token count of `text`: one per SID token, one per pre-token piece elsewhere."""
    import regex

    pattern = regex.compile(QWEN2_PRETOKENIZE)
    return sum(1 if is_sid else len(pattern.findall(piece)) for piece, is_sid in text_pieces(text))


def synthetic_prompt_ids(text: str, sid_ids: dict[str, int], rng: np.random.Generator) -> list[int]:
    """Token ids with the estimated Qwen length of `text`: real SID ids, random ordinary ids elsewhere."""
    import regex

    pattern = regex.compile(QWEN2_PRETOKENIZE)
    ids: list[int] = []
    for piece, is_sid in text_pieces(text):
        if is_sid:
            ids.append(sid_ids[piece])
        else:
            ids.extend(int(t) for t in rng.integers(0, QWEN_EOS_ID - 2, size=len(pattern.findall(piece))))
    return ids


def peak_flops(device_kind: str) -> float | None:
    for prefix, value in PEAK_BF16_FLOPS.items():
        if device_kind.startswith(prefix):
            return value
    return None


def beam_search_flops(shape, prompt_len: int, beams: int, fed_steps: int) -> float:
    """Model FLOPs of one prompt: prefill of prompt_len tokens + beams x fed_steps decode tokens."""
    from rec.model.qwen2 import flops_per_token

    prefill = prompt_len * flops_per_token(shape, prompt_len, training=False)
    decode = beams * fed_steps * flops_per_token(shape, prompt_len + fed_steps, training=False)
    return prefill + decode


def device_facts() -> dict:
    """Device kind, platform, device count, jax version and date (plus CPU load on CPU) for a bench result."""
    import jax

    device = jax.devices()[0]
    facts = {
        "device": getattr(device, "device_kind", str(device)),
        "platform": device.platform,
        "num_devices": jax.device_count(),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
    if device.platform == "cpu" and hasattr(os, "getloadavg"):
        # CPU figures on a shared machine mean little without the load they were taken under.
        facts["cpu_count"] = os.cpu_count()
        facts["host_load_1m"] = round(os.getloadavg()[0], 2)
    return facts


def _utilisation(flops_per_s: float, facts: dict) -> float | None:
    peak = peak_flops(facts["device"])
    return None if peak is None else flops_per_s / (peak * facts["num_devices"])


def _dtype(name: str):
    import jax.numpy as jnp

    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def require_batch_divisible(batch: int, mesh) -> None:
    """RecError when a bench's --batch does not split over the mesh's batch-axis devices."""
    from rec import dist

    if batch % dist.batch_divisor(mesh):
        raise RecError(f"--batch {batch} must be a multiple of the {dist.batch_divisor(mesh)} devices")


def random_params(shape, dtype, mesh, seed: int = 0):
    """Random Qwen2 parameters of `shape` initialised directly into their sharded layout on `mesh`."""
    import functools

    import jax

    from rec import dist
    from rec.model.qwen2 import PARTITION_RULES, init_params

    init = functools.partial(init_params, shape, param_dtype=dtype, vocab_multiple=128)
    abstract = jax.eval_shape(init, jax.random.PRNGKey(0))
    shardings = dist.param_shardings(abstract, mesh, PARTITION_RULES)
    return jax.jit(init, out_shardings=shardings)(jax.random.PRNGKey(seed))


# ---------------------------------------------------------------------------------------------
# eval


def bench_eval(args) -> dict:
    import jax

    from rec import dist
    from rec.data.dataset import available_splits, load_catalogue, read_split
    from rec.data.prompts import eval_prompt
    from rec.decode.beam import constrained_beam_search
    from rec.decode.trie import build_trie
    from rec.model.qwen2 import get_shape, shape_with_vocab
    from rec.tokenizer import sid_tokens

    if not args.data:
        raise RecError("bench eval: --data DIR (a MiniOneRec dataset directory) is required")
    splits = available_splits(args.data)
    split = "valid" if "valid" in splits else ("test" if "test" in splits else "")
    if not split:
        raise RecError(f"{args.data}: no valid.csv or test.csv to build prompts from")
    batch = args.batch or 8
    iters = max(1, args.iters)
    catalogue = load_catalogue(args.data)
    tokens = sid_tokens(catalogue)
    sid_ids = {t: QWEN_BASE_VOCAB + i for i, t in enumerate(tokens)}
    id_to_sid_token = {i: t for t, i in sid_ids.items()}
    shape = get_shape(args.shape, "--shape")
    shape = shape_with_vocab(shape, max(shape.vocab_size, QWEN_BASE_VOCAB + len(tokens)))
    trie = build_trie([[sid_ids[t] for t in toks] for toks in catalogue.sid_tokens], QWEN_NEWLINE_ID, QWEN_EOS_ID)
    beams = min(args.beams, trie.num_sids)

    rows = read_split(args.data, split, limit=batch * (iters + 1))
    rng = np.random.default_rng(0)
    prompts = []
    for row in rows:
        p = eval_prompt(row.history_sids, row.item_sid, style="eval")
        prompts.append(synthetic_prompt_ids(p.header, sid_ids, rng) + synthetic_prompt_ids(p.body, sid_ids, rng))
    lengths = [len(p) for p in prompts]
    prompt_len = int(math.ceil(max(lengths) / 16) * 16)  # one padded length: one compile
    batches = []
    for it in range(iters + 1):
        chosen = [prompts[(it * batch + j) % len(prompts)] for j in range(batch)]
        ids = np.full((batch, prompt_len), QWEN_EOS_ID, np.int32)
        mask = np.zeros((batch, prompt_len), np.int32)
        for j, p in enumerate(chosen):
            ids[j, prompt_len - len(p) :] = p
            mask[j, prompt_len - len(p) :] = 1
        batches.append((ids, mask))

    mesh = dist.make_mesh("auto")
    require_batch_divisible(batch, mesh)
    dtype = _dtype(args.dtype)
    params = random_params(shape, dtype, mesh)

    def call(ids, mask):
        g_ids, g_mask = dist.shard_batch((ids, mask), mesh)
        sids, scores = constrained_beam_search(params, shape, g_ids, g_mask, trie, beams, compute_dtype=dtype)
        return jax.block_until_ready(sids)

    start = time.perf_counter()
    call(*batches[0])
    compile_s = time.perf_counter() - start
    outputs = []
    start = time.perf_counter()
    for ids, mask in batches[1:]:
        outputs.append(call(ids, mask))
    elapsed = time.perf_counter() - start

    valid = set(catalogue.all_sids)
    invalid = 0
    for sids in outputs:
        for row in np.asarray(dist.process_allgather(sids)):
            for beam in row:
                if "".join(id_to_sid_token.get(int(t), "?") for t in beam if t >= 0) not in valid:
                    invalid += 1
    samples_per_s = batch * iters / elapsed
    # The same prompts decoded a few at a time (the smallest batch the mesh allows): the large
    # batch must not change what is found. Fraction of rows with identical ranked lists.
    small = dist.batch_divisor(mesh)
    ids, mask = batches[1]
    big = np.asarray(dist.process_allgather(outputs[0]))
    same = 0
    for start in range(0, batch, small):
        part = np.asarray(dist.process_allgather(call(ids[start : start + small], mask[start : start + small])))
        same += int(sum(np.array_equal(part[j], big[start + j]) for j in range(part.shape[0])))
    agreement = same / batch
    facts = device_facts()
    flops = beam_search_flops(shape, float(np.mean(lengths)), beams, trie.num_steps - 1)
    result = {
        "bench": "eval",
        "shape": args.shape,
        "beams": beams,
        "batch_size": batch,
        "iters": iters,
        "samples_per_s": round(samples_per_s, 3),
        "seconds_per_batch": round(elapsed / iters, 4),
        "compile_s": round(compile_s, 2),
        "invalid": invalid,
        "small_batch_size": small,
        "small_batch_agreement": round(agreement, 4),
        "prompt_len_padded": prompt_len,
        "prompt_tokens_mean": round(float(np.mean(lengths)), 1),
        "prompt_tokens": "estimated (Qwen2 pre-tokenizer rule, synthetic ids)",
        "data": str(args.data),
        "split": split,
        "vocab": shape.vocab_size,
        "dtype": args.dtype,
        "model_tflop_per_sample": round(flops / 1e12, 4),
        **facts,
    }
    mfu = _utilisation(flops * samples_per_s, facts)
    if mfu is not None:
        result["mfu"] = round(mfu, 4)
    return result


# ---------------------------------------------------------------------------------------------
# sft


def bench_sft(args) -> dict:
    import jax
    import jax.numpy as jnp

    from rec import dist
    from rec.config import TrainConfig
    from rec.model.qwen2 import flops_per_token, get_shape, shape_with_vocab
    from rec.train.loop import make_train_step
    from rec.train.optim import make_optimizer
    from rec.train.sft import make_sft_loss
    from rec.train.state import init_state

    batch = args.batch or 16
    seq_len = args.seq_len
    iters = max(1, args.iters)
    shape = get_shape(args.shape, "--shape")
    if args.shape == "tiny":
        shape = shape_with_vocab(shape, QWEN_BASE_VOCAB + 600)  # Qwen vocabulary + an Office-sized SID set
    mesh = dist.make_mesh("auto")
    require_batch_divisible(batch, mesh)
    dtype = _dtype(args.dtype)
    params = random_params(shape, dtype, mesh)
    optimizer = make_optimizer(TrainConfig(steps=iters + 1, warmup_steps=1), iters + 1)
    state = init_state(params, optimizer.tx, 0, mesh)
    step = make_train_step(make_sft_loss(shape, compute_dtype=args.dtype, remat=True), optimizer, mesh=mesh)

    rng = np.random.default_rng(0)
    ids = rng.integers(0, QWEN_EOS_ID, size=(batch, seq_len)).astype(np.int32)
    labels = ids.copy()
    labels[:, : seq_len // 2] = -100  # loss on the response half, as SFT masks the prompt
    positions = np.broadcast_to(np.arange(seq_len, dtype=np.int32), ids.shape).copy()
    host_batch = {"input_ids": ids, "labels": labels, "attention_mask": np.ones_like(ids), "positions": positions,
                  "weights": np.ones((batch,), np.float32)}
    device_batch = dist.shard_batch(host_batch, mesh)

    start = time.perf_counter()
    state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(iters):
        state, metrics = step(state, device_batch)
    jax.block_until_ready(metrics)
    elapsed = time.perf_counter() - start
    tokens_per_s = batch * seq_len * iters / elapsed
    facts = device_facts()
    result = {
        "bench": "sft",
        "shape": args.shape,
        "batch_size": batch,
        "seq_len": seq_len,
        "iters": iters,
        "tokens_per_s": round(tokens_per_s, 1),
        "seconds_per_step": round(elapsed / iters, 4),
        "compile_s": round(compile_s, 2),
        "dtype": args.dtype,
        "loss": float(jnp.asarray(metrics["loss"])),
        **facts,
    }
    mfu = _utilisation(flops_per_token(shape, seq_len, training=True) * tokens_per_s, facts)
    if mfu is not None:
        result["mfu"] = round(mfu, 4)
    return result


# ---------------------------------------------------------------------------------------------
# rollout / rl: owned by the RL stage modules


def _delegate(module_name: str, function: str, args) -> dict:
    if importlib.util.find_spec(module_name) is None:
        raise RecError(f"bench {args.what}: module {module_name} is missing (it provides {function}(args))")
    module = importlib.import_module(module_name)
    fn = getattr(module, function, None)
    if fn is None:
        raise RecError(f"bench {args.what}: {module_name} has no {function}(args)")
    return fn(args)


_BACKEND_COMPILES = [0]


def _count_compiles() -> None:
    """Count XLA backend compilations (jax.monitoring), so a result shows that a benchmark
    compiled once per shape rather than per call."""
    import jax.monitoring

    if getattr(_count_compiles, "installed", False):
        return

    def listener(name: str, *_args, **_kwargs) -> None:
        if name.endswith("backend_compile_duration"):
            _BACKEND_COMPILES[0] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    _count_compiles.installed = True


def memory_facts() -> dict:
    """Peak device memory (GiB, the largest over this process's devices) where the runtime reports
    it (GPU, TPU), else the host process's peak resident memory (CPU)."""
    import jax

    peaks, limits = [], []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats() or {}
        except Exception:  # noqa: BLE001 - not every runtime implements memory_stats
            stats = {}
        if "peak_bytes_in_use" in stats:
            peaks.append(stats["peak_bytes_in_use"])
        if stats.get("bytes_limit"):
            limits.append(stats["bytes_limit"])
    if peaks:
        out = {"peak_memory_gib": round(max(peaks) / 2**30, 3)}
        if limits:
            out["memory_limit_gib"] = round(min(limits) / 2**30, 3)
        return out
    import resource

    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"host_peak_rss_gib": round(rss_kib / 2**20, 3)}


def run_bench(args) -> dict:
    """Dispatch on args.what; print the result as one JSON line on stdout (with the number of
    XLA compilations and peak memory)."""
    runners = {
        "eval": bench_eval,
        "sft": bench_sft,
        "rollout": lambda a: _delegate("rec.train.grpo", "bench_rollout", a),
        "rl": lambda a: _delegate("rec.train.rl", "bench_rl", a),
    }
    if args.what not in runners:
        raise RecError(f"bench: unknown benchmark {args.what!r} (choose from {', '.join(runners)})")
    _count_compiles()
    before = _BACKEND_COMPILES[0]
    result = runners[args.what](args)
    result["xla_compiles"] = _BACKEND_COMPILES[0] - before
    result.update(memory_facts())
    print(json.dumps(result))
    return result
