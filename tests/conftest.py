"""Test-wide settings.

Tests never auto-load plugins installed outside their control: the allow-list
is set to "built-ins only" before anything loads plugins; tests that need the
example plugin enable it by name (see tests/test_plugins.py).
"""

import os

os.environ["FRAMEWORK_PLUGINS"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# Without a GPU, Triton kernels under test run in the interpreter. TRITON_INTERPRET
# is read when a @triton.jit function is defined (triton.language's own helpers
# included, at `import triton`), so it is set here, before any test module can
# import triton. Production code never runs a kernel on a CPU tensor, so this
# only reaches the tests that call kernels directly.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# One intra-op thread: tiny models gain nothing from more, and on a shared
# 2-core machine more threads make timings swing wildly.
torch.set_num_threads(1)
