"""Quantization plugins (GPTQ, AWQ, SqueezeLLM, FP8 KV cache) live here; none is registered yet."""
