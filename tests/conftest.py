"""Test-wide settings.

Tests never auto-load plugins installed outside their control: the allow-list
is set to "built-ins only" before anything loads plugins; tests that need the
example plugin enable it by name (see tests/test_plugins.py).
"""

import os

os.environ["FRAMEWORK_PLUGINS"] = ""
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
