"""The built-in demo model: what `framework generate` / `serve` run by default.

A tiny random-weight Llama (hidden 128, 4 layers, the test tokenizer),
written once into the cache directory and reused. Its output is gibberish;
it exists so the engine can be tried with no download.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from framework.testing.tiny import make_tiny_model

# Bump when the weights or files change, so stale caches are not reused.
DEMO_MODEL_NAME = "demo-model-v1"
DEMO_ARCHITECTURE = "LlamaForCausalLM"
DEMO_CONFIG = {
    "hidden_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 256,
}


def cache_dir() -> Path:
    """$FRAMEWORK_CACHE_DIR, else $XDG_CACHE_HOME/framework, else ~/.cache/framework."""
    if os.environ.get("FRAMEWORK_CACHE_DIR"):
        return Path(os.environ["FRAMEWORK_CACHE_DIR"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(xdg).expanduser() / "framework"


def demo_model_path() -> Path:
    """Return the demo model's directory, creating it on first use.

    Creation is atomic: the model is written to a temporary directory beside
    the final one and renamed into place, so a concurrent or interrupted
    run never leaves a half-written model at the final path. Repeat calls
    only check that the directory exists.

    Returns:
        `<cache dir>/demo-model-v1`, a Hugging Face format model directory.
    """
    final = cache_dir() / DEMO_MODEL_NAME
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}.tmp-", dir=final.parent))
    try:
        make_tiny_model(DEMO_ARCHITECTURE, tmp, seed=0, **DEMO_CONFIG)
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process renamed its copy first (the target is then a
            # non-empty directory); use that one.
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
