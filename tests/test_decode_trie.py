"""SidTrie: hand-computed tables, collisions, mixed 3/4-token SIDs, lookups, errors."""

import numpy as np
import pytest

from rec.decode.beam import decode_sids
from rec.decode.trie import SidTrie, build_trie, split_sid, trie_from_catalogue, trie_from_sids
from rec.errors import RecError

NL, EOS = 1, 2


def tables(trie):
    return [np.asarray(t).tolist() for t in trie.child_tokens], [np.asarray(t).tolist() for t in trie.child_next]


def test_tables_by_hand_with_collision():
    # (5,6,7) twice = two colliding items: one path.
    trie = build_trie([[5, 6, 7], [5, 6, 8], [5, 9, 7], [5, 6, 7], [11, 12, 13]], NL, EOS)
    toks, nexts = tables(trie)
    assert trie.num_steps == 5 and trie.depth == 3 and trie.num_sids == 4
    assert toks[0] == [[5, 11]]
    # level-1 nodes in sorted prefix order: (5,), (11,)
    assert toks[1] == [[6, 9], [12, -1]]
    assert nexts[1] == [[0, 1], [2, 0]]
    # level-2 nodes: (5,6), (5,9), (11,12)
    assert toks[2] == [[7, 8], [7, -1], [13, -1]]
    # level-3 nodes: the 4 complete SIDs, each forced to "\n"; level 4: EOS
    assert toks[3] == [[NL]] * 4
    assert toks[4] == [[EOS]] * 4
    assert trie.allowed_tokens([]) == [5, 11]
    assert trie.allowed_tokens([5, 6]) == [7, 8]
    assert trie.allowed_tokens([5, 6, 8]) == [NL]
    assert trie.allowed_tokens([5, 6, 8, NL]) == [EOS]
    assert trie.allowed_tokens([5, 7]) == []  # off the trie
    assert trie.allowed_tokens([5, 6, 8, NL, EOS]) == []  # complete


def test_mixed_three_and_four_token_sids():
    # (3,4,5) is complete AND extended by a <d_*> level; (3,4,6) only extended.
    trie = build_trie([[3, 4, 5], [3, 4, 5, 20], [3, 4, 6, 20], [3, 4, 6, 21]], NL, EOS)
    assert trie.num_steps == 6 and trie.depth == 4
    assert trie.allowed_tokens([3, 4, 5]) == [NL, 20]
    assert trie.allowed_tokens([3, 4, 6]) == [20, 21]
    assert trie.allowed_tokens([3, 4, 5, NL]) == [EOS]
    assert trie.allowed_tokens([3, 4, 5, 20, NL]) == [EOS]
    assert trie.contains([3, 4, 5]) and trie.contains([3, 4, 5, 20]) and trie.contains([3, 4, 6, 21])
    assert not trie.contains([3, 4, 6]) and not trie.contains([3, 4])
    assert trie.contains([3, 4, 6, 20, -1])  # -1 padding is ignored


def test_tables_agree_with_brute_force_on_random_catalogues():
    rng = np.random.default_rng(3)
    for _ in range(5):
        sids = {tuple(int(x) for x in rng.integers(10, 16, size=rng.choice([3, 4]))) for _ in range(40)}
        trie = build_trie(sorted(sids), NL, EOS)
        paths = [s + (NL, EOS) for s in sids]
        prefixes = {p[:i] for p in paths for i in range(len(p))}
        for prefix in prefixes:
            expected = sorted({p[len(prefix)] for p in paths if p[: len(prefix)] == prefix})
            assert trie.allowed_tokens(list(prefix)) == expected
        mask = trie.allowed_mask([], 20)
        assert mask.tolist() == [i in {s[0] for s in sids} for i in range(20)]


def test_is_a_pytree_with_static_ids():
    import jax

    trie = build_trie([[5, 6, 7], [5, 6, 8]], NL, EOS)
    leaves, treedef = jax.tree_util.tree_flatten(trie)
    assert len(leaves) == 2 * trie.num_steps
    again = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(again, SidTrie) and again.eos_id == EOS and again.newline_id == NL and again.depth == 3


def test_from_sid_strings_and_errors():
    vocab = {"<a_1>": 10, "<b_2>": 11, "<c_3>": 12, "<c_4>": 13}
    trie = trie_from_sids(["<a_1><b_2><c_3>", "<a_1><b_2><c_4>"], vocab, NL, EOS)
    assert trie.allowed_tokens([10, 11]) == [12, 13]
    with pytest.raises(RecError, match=r"<a_1><b_2><c_9>.*<c_9>"):
        trie_from_sids(["<a_1><b_2><c_9>"], vocab, NL, EOS)
    with pytest.raises(RecError, match="not a SID string"):
        split_sid("<a_1> hello")
    with pytest.raises(RecError, match="empty catalogue"):
        build_trie([], NL, EOS)
    with pytest.raises(RecError, match="SID #1"):
        build_trie([[5, 6, 7], [5, EOS, 7]], NL, EOS)


def test_from_catalogue_with_the_synthetic_tokenizer(synth_dataset_dir, synth_tokenizer_dir):
    from rec.data.dataset import load_catalogue
    from rec.tokenizer import load_tokenizer, newline_id

    catalogue = load_catalogue(synth_dataset_dir)
    tok = load_tokenizer(synth_tokenizer_dir)
    trie = trie_from_catalogue(catalogue, tok)
    assert trie.num_sids == len(catalogue.all_sids)
    assert trie.eos_id == tok.eos_token_id and trie.newline_id == newline_id(tok)
    for sid in catalogue.all_sids[:10]:
        ids = tok.convert_tokens_to_ids(split_sid(sid))
        assert trie.contains(ids)
        assert decode_sids(tok, [[ids]]) == [[sid]]
