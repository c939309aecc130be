"""Training: the optimizer, train state and jitted step shared by SFT, RL and GRPO; metrics logging;
model/tokenizer loading (`common`); the stages `sft.run_sft`, `rl.run_rl`, `grpo.run_grpo`.

Modules are imported lazily by the CLI; importing `rec.train` itself pulls in nothing heavy.
"""
