"""Constrained beam search: brute force against an independent reference of HF's pruning rule, exhaustive
ranking when K >= #SIDs, invariants, and parity with `transformers` torch beam search on a real tiny Qwen2.

The stand-in "model" is a log-prob oracle that depends on the whole generated prefix through an
integer hash into a fixed random table, so the reference (plain numpy/python, float64) can ask it
for the log-probs of any prefix, while the JAX search sees the same numbers through its step function.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rec.decode.beam import (
    TRACE_COUNTS,
    beam_search_core,
    constrained_beam_search,
    decode_sids,
    path_to_sid_tokens,
)
from rec.decode.trie import build_trie

NL, EOS = 1, 2
VOCAB = 64
HASH_MOD = 1009
TABLE = (np.random.default_rng(1234).normal(size=(HASH_MOD, VOCAB)) * 3.0).astype(np.float32)


def next_hash(h, tok):
    return (h * 31 + tok + 1) % HASH_MOD


def oracle_logp(h0: int, prefix, table=TABLE) -> np.ndarray:
    """float64 log-softmax of the oracle's logits after `prefix` (generated tokens) for prompt hash h0."""
    h = h0
    for t in prefix:
        h = next_hash(h, t)
    x = table[h].astype(np.float64)
    return x - (np.log(np.exp(x - x.max()).sum()) + x.max())


@functools.partial(jax.jit, static_argnames="beams")
def _oracle_search(h0, trie, table, beams):
    batch = h0.shape[0]

    def step_fn(h, parent, tokens, step):
        # The oracle state (one hash per beam row) is reordered by parent exactly like a KV cache.
        h = jnp.take_along_axis(h.reshape(batch, beams), parent, axis=1).reshape(-1)
        h = next_hash(h, tokens)
        return jax.nn.log_softmax(table[h], axis=-1), h

    first = jax.nn.log_softmax(table[h0], axis=-1)
    paths, scores = beam_search_core(first, step_fn, jnp.repeat(h0, beams), trie, beams)
    return path_to_sid_tokens(paths, trie), scores


def jax_search(prompt_hashes, sids, beams, table=TABLE):
    """The JAX search with the oracle as its model: (sid ids [B,K,depth], scores [B,K], trie)."""
    trie = build_trie(sids, NL, EOS)
    sid_ids, scores = _oracle_search(jnp.asarray(prompt_hashes, jnp.int32), trie, jnp.asarray(table), beams)
    return np.asarray(sid_ids), np.asarray(scores), trie


def hf_reference(h0, sids, beams, table=TABLE):
    """transformers' `_beam_search` (4.57 / 5.x vectorised version) with upstream's
    ConstrainedLogitsProcessor, written out in python for one prompt:
    log_softmax -> +(-1e6 outside the trie's allowed set) -> + running score; top 2K over
    beams x vocab; EOS (or max_length) candidates among the first K are finished and merged into
    a K-slot finished set (initial scores -1e9), others get -1e9; running = top K of the 2K after a
    -1e9 penalty on finished ones; initial running scores [0, -1e9, ...]; length_penalty 0;
    max_new_tokens = longest SID + 2. (The early-stop heuristic only skips work that cannot change
    the result when scores only decrease, so it is left out.) Returns [(sid tuple, score)] of the
    valid finished beams, best first."""
    paths = [tuple(s) + (NL, EOS) for s in sids]
    allowed = {}
    for p in paths:
        for i in range(len(p)):
            allowed.setdefault(p[:i], set()).add(p[i])
    num_steps = max(len(p) for p in paths)
    vocab = table.shape[1]
    running = [((), 0.0)] + [((), -1e9)] * (beams - 1)
    finished = [(-1e9, (), False)] * beams
    for step in range(num_steps):
        cands = []
        for b, (prefix, score) in enumerate(running):
            mask = np.full(vocab, -1e6)
            ok = allowed.get(prefix)
            if ok:  # upstream: an empty lookup leaves the whole row at -1e6
                mask[sorted(ok)] = 0.0
            total = oracle_logp(h0, prefix, table) + mask + score
            cands += [(total[v], b * vocab + v, prefix + (v,)) for v in range(vocab)]
        cands.sort(key=lambda c: (-c[0], c[1]))
        top = cands[: 2 * beams]
        ends = [c[2][-1] == EOS or step == num_steps - 1 for c in top]
        new = [(c[0] if (i < beams and e) else c[0] - 1e9, c[2], i < beams and e) for i, (c, e) in enumerate(zip(top, ends, strict=True))]
        merged = finished + new
        order = sorted(range(len(merged)), key=lambda i: (-merged[i][0], i))[:beams]
        finished = [merged[i] for i in order]
        penal = [(c[0] - 1e9 * e, i) for i, (c, e) in enumerate(zip(top, ends, strict=True))]
        penal.sort(key=lambda x: (-x[0], x[1]))
        running = [(top[i][2], s) for s, i in penal[:beams]]
    valid = [(seq, s) for s, seq, real in finished if real and s > -1e5]
    return [(tuple(t for t in seq if t not in (NL, EOS)), s) for seq, s in valid]


def exhaustive_ranking(h0, sids):
    scored = []
    for sid in sorted(set(map(tuple, sids))):
        path = sid + (NL, EOS)
        scored.append((sid, sum(oracle_logp(h0, path[:i])[path[i]] for i in range(len(path)))))
    return sorted(scored, key=lambda x: -x[1])


def random_catalogue(rng, n, depth, level0_codes, collisions=0, mixed=False):
    sids = set()
    while len(sids) < n:
        d = int(rng.choice([3, 4])) if mixed else depth
        sid = [10 + int(rng.integers(level0_codes))] + [10 + 12 * lvl + int(rng.integers(6)) for lvl in range(1, d)]
        sids.add(tuple(sid))
    sids = sorted(sids)
    return sids + [sids[int(i)] for i in rng.integers(len(sids), size=collisions)]  # duplicated = colliding items


def as_list(sid_ids, scores):
    return [(tuple(int(t) for t in s if t >= 0), float(sc)) for s, sc in zip(sid_ids, scores, strict=True) if sc > -np.inf]


PROMPT_HASHES = [3, 77, 501, 8, 260, 999]
CASES = {
    "depth3": dict(n=25, depth=3, level0_codes=4, beams=4),
    "depth4": dict(n=30, depth=4, level0_codes=4, beams=6),
    "collisions_few_level0": dict(n=20, depth=3, level0_codes=2, beams=5, collisions=6),
    "mixed_3_and_4": dict(n=24, depth=3, level0_codes=3, beams=4, mixed=True),
    "beams_gt_sids": dict(n=5, depth=4, level0_codes=2, beams=8, collisions=2),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_hf_pruning_reference(case):
    spec = dict(CASES[case])
    beams = spec.pop("beams")
    rng = np.random.default_rng(sorted(CASES).index(case))
    sids = random_catalogue(rng, **spec)
    sid_ids, scores, trie = jax_search(PROMPT_HASHES, sids, beams)
    num_sids = len(set(map(tuple, sids)))
    assert trie.num_sids == num_sids
    for b, h0 in enumerate(PROMPT_HASHES):
        got = as_list(sid_ids[b], scores[b])
        want = hf_reference(h0, sids, beams)
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=0, atol=1e-4)
        # Invariants: min(K, #SIDs) distinct valid SIDs, best first; unfilled slots are -inf / -1.
        assert len(got) == min(beams, num_sids)
        assert len({s for s, _ in got}) == len(got)
        assert all(trie.contains(s) for s, _ in got)
        assert np.all(np.diff(scores[b][: len(got)]) <= 0)
        assert np.all(sid_ids[b][len(got):] == -1) and np.all(np.isneginf(scores[b][len(got):]))
        if beams >= num_sids:
            exact = exhaustive_ranking(h0, sids)
            assert [s for s, _ in got] == [s for s, _ in exact]
            np.testing.assert_allclose([x for _, x in got], [x for _, x in exact], rtol=0, atol=1e-4)


def test_pruning_differs_from_exhaustive_somewhere():
    """Guard against a search that silently ranks exhaustively: with K < #SIDs HF pruning is
    approximate, and on the "depth3" catalogue it misses an SID the exhaustive ranking returns.
    (Same catalogue, prompts and K as that case, so the compiled search is reused.)"""
    spec = dict(CASES["depth3"])
    beams = spec.pop("beams")
    sids = random_catalogue(np.random.default_rng(sorted(CASES).index("depth3")), **spec)
    sid_ids, scores, _ = jax_search(PROMPT_HASHES, sids, beams)
    differs = 0
    for b, h0 in enumerate(PROMPT_HASHES):
        got = [s for s, _ in as_list(sid_ids[b], scores[b])]
        differs += got != [s for s, _ in exhaustive_ranking(h0, sids)[:beams]]
    assert differs > 0


@pytest.mark.parametrize("dataset", ["industrial", "office"])
def test_real_catalogue_fifty_beams(dataset, request):
    """The shipped catalogues (Industrial has only 48 level-a codes for 50 beams): 50 distinct valid
    SIDs per prompt, equal to the HF reference, with SID tokens numbered in sorted order like the
    extended tokenizer."""
    from rec.data.dataset import load_catalogue
    from rec.tokenizer import sid_tokens

    catalogue = load_catalogue(str(request.getfixturevalue(f"{dataset}_dir")))
    tokens = sid_tokens(catalogue)
    token_id = {t: 3 + i for i, t in enumerate(tokens)}
    sids = [[token_id[t] for t in toks] for toks in catalogue.sid_tokens]
    table = (np.random.default_rng(5).normal(size=(HASH_MOD, 3 + len(tokens))) * 3.0).astype(np.float32)
    hashes = [11, 400]
    sid_ids, scores, trie = jax_search(hashes, sids, 50, table)
    # reference/minionerec-upstream.md §1.4: distinct SIDs and level-a codes of the shipped index
    assert trie.num_sids == len(catalogue.all_sids) == {"industrial": 3670, "office": 3444}[dataset]
    assert len(trie.allowed_tokens([])) == {"industrial": 48, "office": 88}[dataset]
    for b, h0 in enumerate(hashes):
        got = as_list(sid_ids[b], scores[b])
        assert len({s for s, _ in got}) == 50
        assert all(trie.contains(s) for s, _ in got)
        want = hf_reference(h0, sids, 50, table)
        assert [s for s, _ in got] == [s for s, _ in want]
        np.testing.assert_allclose([x for _, x in got], [x for _, x in want], rtol=0, atol=1e-3)


def test_decode_sids():
    vocab = {10: "<a_1>", 11: "<b_2>", 12: "<c_3>", 13: "<d_0>"}
    ids = np.array([[[10, 11, 12, -1], [10, 11, 12, 13]]])
    assert decode_sids(vocab, ids) == [["<a_1><b_2><c_3>", "<a_1><b_2><c_3><d_0>"]]

    class Tok:
        def convert_ids_to_tokens(self, i):
            return vocab[i]

    assert decode_sids(Tok(), ids[:, :1]) == [["<a_1><b_2><c_3>"]]


# ---------------------------------------------------------------------------------------------
# The real model: parity with transformers' torch beam search, left padding, no recompilation.

TORCH_VOCAB = 120
SID_LEVELS = [(40, 46), (50, 62), (62, 72)]  # token id ranges of the SID levels in the tiny vocab


def torch_trie_processor(torch, prompt_width, sids, newline_id=NL, eos_id=EOS):
    from transformers import LogitsProcessor

    allowed = {}
    for s in sids:
        p = tuple(s) + (newline_id, eos_id)
        for i in range(len(p)):
            allowed.setdefault(p[:i], set()).add(p[i])

    class TrieMask(LogitsProcessor):
        """Upstream's ConstrainedLogitsProcessor: log_softmax, then -1e6 outside the allowed set."""

        def __call__(self, input_ids, scores):
            logp = torch.log_softmax(scores.float(), dim=-1)
            mask = torch.full_like(logp, -1e6)
            for row in range(input_ids.shape[0]):
                ok = allowed.get(tuple(input_ids[row, prompt_width:].tolist()))
                if ok:
                    mask[row, sorted(ok)] = 0.0
            return logp + mask

    return TrieMask()


@pytest.fixture(scope="module")
def tiny_model(tiny_hf_dir_factory):
    torch = pytest.importorskip("torch")
    from transformers import Qwen2ForCausalLM

    from rec.model.hf_io import load_hf

    model_dir = tiny_hf_dir_factory(vocab_size=TORCH_VOCAB, tied=True, seed=3)
    shape, params = load_hf(str(model_dir), "float32", vocab_multiple=64, progress=False)
    torch_model = Qwen2ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    return torch, torch_model, shape, params


def left_padded_prompts(rng, lengths):
    width = max(lengths)
    ids = np.full((len(lengths), width), EOS, np.int32)
    mask = np.zeros((len(lengths), width), np.int32)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = rng.integers(80, TORCH_VOCAB, size=n)
        mask[i, width - n:] = 1
    return ids, mask


@pytest.fixture(scope="module")
def plain_search(tiny_model):
    """The catalogue, prompts (left-padded, different lengths) and the f32 plain-attention result."""
    _, _, shape, params = tiny_model
    rng = np.random.default_rng(0)
    sids = sorted({tuple(int(rng.integers(lo, hi)) for lo, hi in SID_LEVELS) for _ in range(60)})
    trie = build_trie(sids, NL, EOS)
    beams = 8  # > the 6 level-a codes: step 0 has fewer continuations than beams
    ids, mask = left_padded_prompts(rng, [6, 11, 3, 9])
    sid_ids, scores = constrained_beam_search(params, shape, ids, mask, trie, beams, compute_dtype=jnp.float32,
                                              decode_attention="plain")
    return dict(sids=sids, trie=trie, beams=beams, ids=ids, mask=mask, sid_ids=np.asarray(sid_ids),
                scores=np.asarray(scores), rng=rng)


@pytest.mark.torch
def test_matches_transformers_generate(tiny_model, plain_search):
    torch, torch_model, _, _ = tiny_model
    from transformers import GenerationConfig

    ids, beams, trie = plain_search["ids"], plain_search["beams"], plain_search["trie"]
    config = GenerationConfig(num_beams=beams, num_return_sequences=beams, length_penalty=0.0, do_sample=False,
                              max_new_tokens=trie.num_steps, early_stopping=False, pad_token_id=EOS,
                              eos_token_id=EOS, bos_token_id=None)
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                   attention_mask=torch.tensor(plain_search["mask"], dtype=torch.long),
                                   generation_config=config,
                                   logits_processor=[torch_trie_processor(torch, ids.shape[1], plain_search["sids"])],
                                   output_scores=True, return_dict_in_generate=True)
    hf_seq = out.sequences[:, ids.shape[1]:].numpy().reshape(len(ids), beams, -1)
    hf_scores = out.sequences_scores.numpy().reshape(len(ids), beams)
    for b in range(len(ids)):
        assert [tuple(s) for s in plain_search["sid_ids"][b].tolist()] == [tuple(s[:3]) for s in hf_seq[b].tolist()]
        assert all(list(s[3:]) == [NL, EOS] for s in hf_seq[b].tolist())
        np.testing.assert_allclose(plain_search["scores"][b], hf_scores[b], rtol=0, atol=2e-4)
        assert len({tuple(s) for s in plain_search["sid_ids"][b].tolist()}) == beams


@pytest.mark.torch
def test_fast_attention_close_and_no_recompile(tiny_model, plain_search):
    _, _, shape, params = tiny_model
    trie, beams, ids, mask = (plain_search[k] for k in ("trie", "beams", "ids", "mask"))
    fast_ids, fast_scores = constrained_beam_search(params, shape, ids, mask, trie, beams, compute_dtype=jnp.float32,
                                                    decode_attention="fast")
    # bf16 operands in the fast attention: near-ties may swap neighbours or the last beam, but each
    # SID found by both gets the same score within bf16 tolerance, and the score profiles agree.
    np.testing.assert_allclose(np.asarray(fast_scores), plain_search["scores"], rtol=0, atol=0.05)
    for b in range(len(ids)):
        fast = dict(as_list(np.asarray(fast_ids)[b], np.asarray(fast_scores)[b]))
        plain = dict(as_list(plain_search["sid_ids"][b], plain_search["scores"][b]))
        assert len(set(fast) ^ set(plain)) <= 2
        for sid in set(fast) & set(plain):
            assert abs(fast[sid] - plain[sid]) < 0.05

    before = TRACE_COUNTS["constrained_beam_search"]
    # Same (B, T, K); one row is empty (all padding) and must still decode to valid SIDs, no NaN.
    other_ids, other_mask = left_padded_prompts(np.random.default_rng(7), [2, 11, 0, 1])
    other_sids, other_scores = constrained_beam_search(params, shape, other_ids, other_mask, trie, beams,
                                                       compute_dtype=jnp.float32, decode_attention="plain")
    assert TRACE_COUNTS["constrained_beam_search"] == before  # reused the compiled program
    assert all(trie.contains(s) for s in np.asarray(other_sids).reshape(-1, 3).tolist())
    assert np.all(np.diff(np.asarray(other_scores), axis=1) <= 0) and np.isfinite(np.asarray(other_scores)).all()


@pytest.mark.torch
def test_upstream_eval_flow_with_sid_tokenizer(synth_dataset_dir, synth_tokenizer_dir, tiny_hf_dir_factory):
    """The upstream evaluate.py flow end to end on a tiny model whose tokenizer holds the SID tokens:
    eval prompts (header and body tokenized separately, left-padded with EOS), HF beam search with
    the trie processor, outputs decoded with the tokenizer -> the same SID lists as ours."""
    torch = pytest.importorskip("torch")
    from transformers import GenerationConfig, Qwen2ForCausalLM

    from rec.data.dataset import load_catalogue, read_split
    from rec.data.prompts import eval_prompt
    from rec.decode.trie import split_sid, trie_from_catalogue
    from rec.model.hf_io import load_hf
    from rec.tokenizer import encode, load_tokenizer

    tok = load_tokenizer(synth_tokenizer_dir)
    catalogue = load_catalogue(synth_dataset_dir)
    trie = trie_from_catalogue(catalogue, tok)
    model_dir = tiny_hf_dir_factory(vocab_size=len(tok), tied=True, seed=1)
    shape, params = load_hf(str(model_dir), "float32", progress=False)
    torch_model = Qwen2ForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()

    rows = read_split(synth_dataset_dir, "test", limit=3)
    prompts = [eval_prompt(r.history_sids, r.item_sid, style="eval") for r in rows]
    token_lists = [encode(tok, p.header) + encode(tok, p.body) for p in prompts]
    width = max(len(t) for t in token_lists)
    ids = np.full((len(rows), width), tok.eos_token_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, t in enumerate(token_lists):
        ids[i, width - len(t):], mask[i, width - len(t):] = t, 1
    beams = 6
    sid_ids, _ = constrained_beam_search(params, shape, ids, mask, trie, beams, compute_dtype=jnp.float32,
                                         decode_attention="plain")
    ours = decode_sids(tok, np.asarray(sid_ids))

    sids = [tok.convert_tokens_to_ids(split_sid(s)) for s in catalogue.all_sids]
    processor = torch_trie_processor(torch, width, sids, trie.newline_id, tok.eos_token_id)
    config = GenerationConfig(num_beams=beams, num_return_sequences=beams, length_penalty=0.0, do_sample=False,
                              max_new_tokens=trie.num_steps, early_stopping=False, pad_token_id=tok.eos_token_id,
                              eos_token_id=tok.eos_token_id, bos_token_id=None)
    with torch.no_grad():
        out = torch_model.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                                   attention_mask=torch.tensor(mask, dtype=torch.long), generation_config=config,
                                   logits_processor=[processor])
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    theirs = [[t.strip() for t in texts[i * beams:(i + 1) * beams]] for i in range(len(rows))]
    assert ours == theirs
    known = set(catalogue.all_sids)
    assert all(s in known for row in ours for s in row)
