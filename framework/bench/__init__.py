"""``framework bench``: throughput and latency benchmarks in vLLM's conventions."""
