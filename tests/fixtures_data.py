"""Shared data fixtures (loaded by tests/conftest.py for every test module).

- `synth_dataset_dir`: a small synthetic MiniOneRec dataset (train/valid/test, info, index, item,
  meta), built once per test session (per xdist worker). Treat it as read-only.
- `synth_tokenizer_dir`: a byte-level BPE tokenizer trained on it, SID tokens added.
- `make_synth_dataset(tmp_path, **kwargs)`: build a fresh one with other sizes/levels.
"""

from __future__ import annotations

import pytest

SYNTH_SMALL = {"users": 120, "items": 48, "seed": 0, "levels": 3}


def make_synth_dataset(directory, **kwargs) -> str:
    from rec.data.synth import synthesize

    return synthesize(str(directory), **{**SYNTH_SMALL, **kwargs})


@pytest.fixture(scope="session")
def synth_dataset_dir(tmp_path_factory) -> str:
    return make_synth_dataset(tmp_path_factory.mktemp("synth") / "dataset")


@pytest.fixture(scope="session")
def synth_tokenizer_dir(tmp_path_factory, synth_dataset_dir) -> str:
    from rec.tokenizer import build_tokenizer

    return build_tokenizer(synth_dataset_dir, str(tmp_path_factory.mktemp("synth_tok") / "tokenizer"), vocab_size=400)
