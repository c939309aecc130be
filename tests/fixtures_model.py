"""Model fixtures shared across areas: tiny random torch Qwen2 checkpoints on disk.

`tiny_hf_dir_factory(vocab_size=..., tied=...)` writes (once per session and argument set) a
Hugging Face model directory made by `transformers.Qwen2ForCausalLM.save_pretrained` from a random
float32 model, and returns its path. Tests that use it need torch and are skipped without it.
"""

from __future__ import annotations

import pathlib
import shutil

import pytest

TINY_HF = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2
)


def make_tiny_torch_qwen2(
    vocab_size: int, tied: bool, rope_theta: float = 1_000_000.0, seed: int = 0, init_std: float = 0.2
):
    """A random float32 torch Qwen2ForCausalLM with the tiny shape (eager attention).

    `init_std` is larger than HF's 0.02 and biases/norms are randomised too, so the parity tests
    exercise every parameter (HF init leaves biases at 0 and norms at 1).
    """
    torch = pytest.importorskip("torch")
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=vocab_size,
        max_position_embeddings=4096,
        rms_norm_eps=1e-6,
        rope_theta=rope_theta,
        tie_word_embeddings=tied,
        initializer_range=init_std,
        attn_implementation="eager",
        **TINY_HF,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.normal_(0.0, 0.1)
            elif "norm" in name:
                param.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="session")
def tiny_hf_dir_factory(tmp_path_factory):
    """make(vocab_size=300, tied=True, rope_theta=1e6, seed=0, tokenizer_dir=None) -> pathlib.Path."""
    made: dict[tuple, pathlib.Path] = {}

    def make(
        vocab_size: int = 300,
        tied: bool = True,
        rope_theta: float = 1_000_000.0,
        seed: int = 0,
        tokenizer_dir: str | pathlib.Path | None = None,
    ) -> pathlib.Path:
        key = (vocab_size, tied, rope_theta, seed, str(tokenizer_dir) if tokenizer_dir else None)
        if key not in made:
            model = make_tiny_torch_qwen2(vocab_size, tied, rope_theta, seed)
            out = tmp_path_factory.mktemp(f"tiny_qwen2_v{vocab_size}_{'tied' if tied else 'untied'}")
            model.save_pretrained(out)
            if tokenizer_dir is not None:
                for item in pathlib.Path(tokenizer_dir).iterdir():
                    if item.is_file():
                        shutil.copy2(item, out / item.name)
            made[key] = out
        return made[key]

    return make
