"""rec.model: the Qwen2 decoder (`qwen2`), Hugging Face safetensors in/out (`hf_io`), vocabulary growth (`resize`)."""
