"""Tokenizers: load a Hugging Face tokenizer directory, add the SID tokens, build a small BPE.

Upstream (reference §3) extends the base tokenizer with every distinct SID token of index.json,
sorted as plain strings (so `<a_104>` < `<a_14>`, and all `<a_*>` < `<b_*>` < `<c_*>`), added as
ordinary (non-special) tokens so they are never split; new ids follow in that order. We do the same
so released or PyTorch checkpoints line up id for id. Pad = EOS, left padding, no BOS.

`build_tokenizer` makes a small byte-level BPE for the demo and tests: trained on the dataset's
titles, descriptions and the prompt templates, with `<|endoftext|>` and `<|im_end|>` as specials
(EOS = pad = `<|im_end|>`, as Qwen2.5-Instruct), then the SID tokens added, saved with
`save_pretrained` so `AutoTokenizer.from_pretrained` reloads it with identical ids.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping

from rec import storage
from rec.errors import RecError

EOS_TOKEN = "<|im_end|>"
ENDOFTEXT_TOKEN = "<|endoftext|>"
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _quiet_transformers():
    # transformers prints a banner about missing torch/flax on import; tokenizers work without them.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import transformers  # noqa: PLC0415

    transformers.logging.set_verbosity_error()
    return transformers


def load_tokenizer(directory: str):
    """A fast HF tokenizer from a local or gs:// directory, offline; pad = eos when it has no pad
    token, left padding (decoding batches of prompts)."""
    transformers = _quiet_transformers()
    with storage.local_copy(str(directory)) as local:
        tok = _from_local_files(transformers, local, directory)
    if tok.eos_token is None:
        raise RecError(f"{directory}: tokenizer has no eos_token (set it in tokenizer_config.json)")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left"
    return tok


def _from_local_files(transformers, local: str, directory: str):
    """The tokenizer held in memory (a downloaded copy is removed once this returns)."""
    if not os.path.isdir(local):
        raise RecError(f"{directory}: tokenizer directory not found")
    if not any(os.path.exists(os.path.join(local, n)) for n in ("tokenizer.json", "vocab.json", "tokenizer.model")):
        raise RecError(f"{directory}: no tokenizer files (tokenizer.json or vocab.json) in this directory")
    try:
        if os.path.exists(os.path.join(local, "tokenizer.json")):
            # tokenizer.json fully defines a fast tokenizer (pre-tokenizer, merges, added tokens);
            # loading it directly avoids AutoTokenizer's model-registry import (seconds, pulls torch).
            return transformers.PreTrainedTokenizerFast.from_pretrained(local, local_files_only=True)
        return transformers.AutoTokenizer.from_pretrained(local, local_files_only=True, use_fast=True)
    except (OSError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RecError(f"{directory}: cannot load tokenizer ({first})") from None


def sid_tokens(source) -> list[str]:
    """Every distinct SID token, sorted as plain strings (upstream TokenExtender order).

    `source`: a Catalogue (its `sid_tokens`), an index.json dict (item id -> token list), or an
    iterable of token lists."""
    if hasattr(source, "sid_tokens"):
        lists: Iterable = source.sid_tokens
    elif isinstance(source, Mapping):
        lists = source.values()
    else:
        lists = source
    return sorted({token for tokens in lists for token in tokens})


def add_sid_tokens(tok, tokens: list[str]) -> int:
    """Add the tokens the tokenizer does not know yet, as normal added tokens, in the given
    (sorted) order; return how many were added."""
    from tokenizers import AddedToken  # noqa: PLC0415

    vocab = tok.get_vocab()
    missing = [t for t in tokens if t not in vocab]
    if not missing:
        return 0
    # normalized=False: the token matches the raw text exactly, whatever the normalizer does.
    return tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in missing])


def encode(tok, text: str) -> list[int]:
    """Token ids of `text` with no special tokens (Qwen adds none anyway; no BOS)."""
    return list(tok.encode(text, add_special_tokens=False))


def newline_id(tok) -> int:
    """The id of "\\n"; the SID trie forces it after the last SID token, so it must be one token."""
    ids = encode(tok, "\n")
    if len(ids) != 1:
        raise RecError(f"tokenizer encodes '\\n' as {len(ids)} tokens {ids}; the SID decoder needs a single token")
    return ids[0]


def _training_texts(dataset_dir: str, catalogue) -> list[str]:
    from rec.data import prompts  # noqa: PLC0415
    from rec.data.dataset import available_splits, category_phrase, read_split  # noqa: PLC0415

    category = category_phrase(dataset_dir)
    texts = list(catalogue.titles)
    for item_id in range(len(catalogue)):
        texts.extend(catalogue.description_texts(item_id))
    # Templates several times so their words become merges even on a tiny vocabulary.
    texts.extend(prompts.template_texts(category) * 20)
    # Some title-history prompts: titles in the quoted, tab-joined form the prompts use. (SID
    # tokens are added tokens, never BPE'd, so SID prompts teach the BPE nothing more.)
    for split in available_splits(dataset_dir)[:1]:
        for row in read_split(dataset_dir, split, limit=200):
            texts.append(prompts.title_history(row.history_titles, row.item_title, category, 0).text)
    return texts


def build_tokenizer(dataset_dir: str, out_dir: str, vocab_size: int = 512) -> str:
    """Train a byte-level BPE on a dataset's text, add its SID tokens, save it to `out_dir`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: PLC0415

    transformers = _quiet_transformers()
    from rec.data.dataset import load_catalogue  # noqa: PLC0415

    if vocab_size < 256 + 2:
        raise RecError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at least 258 (256 bytes + 2 specials)")
    catalogue = load_catalogue(dataset_dir)
    texts = _training_texts(dataset_dir, catalogue)
    bpe = Tokenizer(models.BPE())
    # Qwen2's split pattern (digits one by one, punctuation keeps its trailing newlines, so
    # "### Response:\n" is 3 tokens as upstream's trie code assumes), then byte-level mapping.
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        padding_side="left",
        model_max_length=32768,
    )
    add_sid_tokens(tok, sid_tokens(catalogue))
    newline_id(tok)  # fail now rather than at decode time
    save_tokenizer(tok, out_dir)
    return out_dir


def save_tokenizer(tok, out_dir: str) -> None:
    """Save a (possibly extended) tokenizer to a local or gs:// directory, file by file atomically."""
    with tempfile.TemporaryDirectory(prefix="rec-tok-") as tmp:
        tok.save_pretrained(tmp)
        # tokenizer_config.json last: a directory without it does not load, so an interrupted
        # write never looks like a complete tokenizer.
        names = sorted(os.listdir(tmp), key=lambda n: (n == "tokenizer_config.json", n))
        storage.makedirs(out_dir)
        for name in names:
            path = os.path.join(tmp, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    storage.write_bytes(storage.join(out_dir, name), f.read())
