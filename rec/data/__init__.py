"""Data for the recommender and GRPO stages.

- `dataset`: read a MiniOneRec dataset directory (CSV splits, info.txt, index.json, item.json).
- `check`: list every problem of a dataset directory (`rec data check`).
- `synth`: generate a small dataset with learnable structure (`rec data synth`, the demo).
- `prompts`: the upstream prompt strings, character for character (answer leak fixed).
- `sft`: SFT token examples and fixed-shape bucketed batches; eval prompt token ids.
- `rl`: RL prompt sets, each prompt with its own target SID.
- `gsm8k`: GSM8K questions/answers for `rec grpo`.
"""
