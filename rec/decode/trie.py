"""The SID trie as fixed-shape device arrays, for constrained decoding.

A catalogue item's semantic ID is a short token sequence such as ``<a_12><b_7><c_201>`` (3 tokens,
or 4 when a ``<d_*>`` level resolves collisions; both lengths may coexist). Generation must emit a
catalogue SID followed by the forced suffix "\\n" then EOS, exactly as upstream's trie
(reference/minionerec-upstream.md §7.1). We therefore build the trie over the *full generated path*
``sid tokens + [newline_id, eos_id]`` so the suffix steps are ordinary trie steps.

Layout (one entry per step ``s`` of the path, ``s = 0 .. num_steps-1``):

* ``child_tokens[s]``: int32 ``[N_s, M_s]``: the allowed next token ids of each node of level ``s``
  (nodes = distinct path prefixes of length ``s``; level 0 has the single root), sorted ascending,
  padded with ``-1`` to the largest fan-out ``M_s`` of that level;
* ``child_next[s]``: int32 ``[N_s, M_s]``: the level-``s+1`` node each child leads to (``0`` in
  padding and on the last level).

A decoding step therefore looks up the allowed set of every beam with one gather
(``child_tokens[s][node]``), with shapes fixed by the trie, not by the data. Duplicate SIDs
(colliding items) collapse to one path. The arrays are the leaves of a registered pytree, so a
`SidTrie` can be passed straight into jitted code; the scalar facts (ids, depth) are static.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rec.errors import RecError

# One SID token: "<x_N>" with a lowercase level letter, as upstream's index.json writes them.
SID_TOKEN_RE = re.compile(r"<[a-z]_\d+>")


@jax.tree_util.register_pytree_node_class
class SidTrie:
    """Per-level child tables of the SID trie (see module docstring).

    Build with `build_trie` (token ids) or `trie_from_sids` (SID strings + a tokenizer).
    """

    def __init__(
        self,
        child_tokens: Sequence[jax.Array],
        child_next: Sequence[jax.Array],
        *,
        newline_id: int,
        eos_id: int,
        max_sid_len: int,
        num_sids: int,
    ):
        self.child_tokens = tuple(child_tokens)
        self.child_next = tuple(child_next)
        self.newline_id = int(newline_id)
        self.eos_id = int(eos_id)
        self.max_sid_len = int(max_sid_len)  # SID tokens only (3 or 4), without "\n"/EOS
        self.num_sids = int(num_sids)  # distinct SIDs (collisions merged)
        self._host = None

    # -- pytree protocol: arrays are leaves, ids and sizes are static --------------------------
    def tree_flatten(self):
        aux = (len(self.child_tokens), self.newline_id, self.eos_id, self.max_sid_len, self.num_sids)
        return (*self.child_tokens, *self.child_next), aux

    @classmethod
    def tree_unflatten(cls, aux, leaves):
        n, newline_id, eos_id, max_sid_len, num_sids = aux
        return cls(leaves[:n], leaves[n:], newline_id=newline_id, eos_id=eos_id, max_sid_len=max_sid_len,
                   num_sids=num_sids)

    # -- facts -----------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Generated tokens of the longest path: SID tokens + "\\n" + EOS."""
        return len(self.child_tokens)

    @property
    def depth(self) -> int:
        """Number of SID levels of the longest SID (3 or 4)."""
        return self.max_sid_len

    def max_fanout(self, step: int) -> int:
        return int(self.child_tokens[step].shape[1])

    # -- host-side lookups (tests, validity checks; not for the decode loop) ------------------------
    def _host_tables(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        # Host copies, fetched once: the lookups below walk them many times.
        if getattr(self, "_host", None) is None:
            self._host = ([np.asarray(t) for t in self.child_tokens], [np.asarray(t) for t in self.child_next])
        return self._host

    def _walk(self, prefix: Sequence[int]) -> int | None:
        """Level-len(prefix) node reached by `prefix`, or None if it leaves the trie."""
        tokens, nexts = self._host_tables()
        node = 0
        for step, tok in enumerate(prefix):
            if step >= self.num_steps:
                return None
            hits = np.nonzero(tokens[step][node] == int(tok))[0]
            if hits.size == 0:
                return None
            node = int(nexts[step][node, hits[0]])
        return node

    def allowed_tokens(self, prefix: Sequence[int]) -> list[int]:
        """Token ids allowed after the generated `prefix` (empty when off the trie or complete)."""
        node = self._walk(prefix)
        if node is None or len(prefix) >= self.num_steps:
            return []
        toks = self._host_tables()[0][len(prefix)][node]
        return [int(t) for t in toks if t >= 0]

    def allowed_mask(self, prefix: Sequence[int], vocab_size: int) -> np.ndarray:
        """Boolean [vocab_size] mask of the tokens allowed after the generated `prefix`."""
        mask = np.zeros(vocab_size, dtype=bool)
        mask[self.allowed_tokens(prefix)] = True
        return mask

    def contains(self, sid_tokens: Sequence[int]) -> bool:
        """Whether the SID token ids form a complete catalogue SID."""
        toks = [int(t) for t in sid_tokens if int(t) >= 0]
        return self.newline_id in self.allowed_tokens(toks)


def build_trie(sid_token_ids: Iterable[Sequence[int]], newline_id: int, eos_id: int) -> SidTrie:
    """Trie over ``sid + [newline_id, eos_id]`` for every SID (token id sequences of length 3 or 4)."""
    paths = set()
    for i, sid in enumerate(sid_token_ids):
        toks = tuple(int(t) for t in sid)
        if not toks:
            raise RecError(f"SID #{i}: empty token sequence")
        if any(t < 0 for t in toks) or newline_id in toks or eos_id in toks:
            raise RecError(f"SID #{i}: token ids {list(toks)} contain a negative, newline or EOS id")
        paths.add(toks + (int(newline_id), int(eos_id)))
    if not paths:
        raise RecError("cannot build a SID trie from an empty catalogue")
    num_steps = max(len(p) for p in paths)

    # level -> {prefix: node index}; nodes numbered in sorted prefix order (deterministic).
    child_tokens, child_next = [], []
    level_nodes = {(): 0}
    for step in range(num_steps):
        children: dict[tuple, set[int]] = {prefix: set() for prefix in level_nodes}
        for p in paths:
            if len(p) > step and p[:step] in children:
                children[p[:step]].add(p[step])
        # Only prefixes that did not just end with EOS continue; they are numbered in sorted order.
        next_prefixes = sorted({prefix + (t,) for prefix, toks in children.items() for t in toks if t != eos_id})
        next_nodes = {prefix: i for i, prefix in enumerate(next_prefixes)}
        fanout = max(1, max(len(t) for t in children.values()))
        toks_arr = np.full((len(level_nodes), fanout), -1, dtype=np.int32)
        next_arr = np.zeros((len(level_nodes), fanout), dtype=np.int32)
        for prefix, node in level_nodes.items():
            for j, t in enumerate(sorted(children[prefix])):
                toks_arr[node, j] = t
                next_arr[node, j] = next_nodes.get(prefix + (t,), 0)  # 0 after EOS: never used
        child_tokens.append(jnp.asarray(toks_arr))
        child_next.append(jnp.asarray(next_arr))
        level_nodes = next_nodes
        if not level_nodes:
            break
    return SidTrie(child_tokens, child_next, newline_id=newline_id, eos_id=eos_id,
                   max_sid_len=num_steps - 2, num_sids=len(paths))


def split_sid(sid: str) -> list[str]:
    """"<a_1><b_2><c_3>" -> ["<a_1>", "<b_2>", "<c_3>"]; RecError if it is not a SID string."""
    tokens = SID_TOKEN_RE.findall(sid)
    if not tokens or "".join(tokens) != sid.strip():
        raise RecError(f"{sid!r}: not a SID string like '<a_1><b_2><c_3>'")
    return tokens


def trie_from_sids(
    sids: Iterable[str],
    token_to_id: Mapping[str, int] | Callable[[str], int | None] | object,
    newline_id: int,
    eos_id: int,
) -> SidTrie:
    """Build the trie from SID strings; `token_to_id` is a tokenizer, a dict or a callable.

    Every SID token must be a single known token (the tokenizer was extended with the catalogue's
    SID tokens); an unknown one is a RecError naming the SID.
    """
    lookup = _token_lookup(token_to_id)
    seqs = []
    for sid in sids:
        ids = []
        for tok in split_sid(sid):
            tid = lookup(tok)
            if tid is None or tid < 0:
                raise RecError(f"SID {sid!r}: token {tok} is not in the tokenizer vocabulary (add the SID tokens first)")
            ids.append(int(tid))
        seqs.append(ids)
    return build_trie(seqs, newline_id, eos_id)


def _token_lookup(token_to_id) -> Callable[[str], int | None]:
    if isinstance(token_to_id, Mapping):
        return token_to_id.get
    if hasattr(token_to_id, "get_vocab"):  # HF tokenizer: exact vocabulary lookup, no fallback to unk
        vocab = token_to_id.get_vocab()
        return vocab.get
    if callable(token_to_id):
        return token_to_id
    raise TypeError(f"token_to_id must be a tokenizer, mapping or callable, not {type(token_to_id).__name__}")


def trie_from_catalogue(catalogue, tokenizer) -> SidTrie:
    """The trie of every distinct SID of a `rec.data.dataset.Catalogue`, with the tokenizer's "\\n"
    (must be one token) and EOS ids as the forced suffix."""
    from rec.tokenizer import newline_id  # noqa: PLC0415 (tokenizer imports transformers)

    if tokenizer.eos_token_id is None:
        raise RecError("tokenizer has no eos_token: the SID decoder needs one to end a SID")
    return trie_from_sids(catalogue.all_sids, tokenizer, newline_id(tokenizer), int(tokenizer.eos_token_id))
