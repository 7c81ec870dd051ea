"""Test helpers for the framework and for plugin authors: tiny Hugging Face
format models with random weights and a locally trained tokenizer, so tests
never download anything.

    from framework.testing import make_tiny_model
    path = make_tiny_model("LlamaForCausalLM", tmp_path / "llama")
"""

from framework.testing.demo import demo_model_path
from framework.testing.tiny import ARCHITECTURES, make_tiny_model
from framework.testing.tokenizer import make_tokenizer

__all__ = ["ARCHITECTURES", "demo_model_path", "make_tiny_model", "make_tokenizer"]
