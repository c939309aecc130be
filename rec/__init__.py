"""rec: generative recommenders with semantic IDs and GRPO post-training, in JAX."""

__version__ = "0.1.0"
