"""The `framework` command line (run as a subprocess, as a user would)."""

import os
import subprocess
import sys

from framework.config import EngineConfig
from framework.entrypoints.cli import build_parser
from framework.testing import make_tiny_model


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "framework", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_every_engine_setting_is_a_kebab_case_flag():
    gen = build_parser()._subparsers._group_actions[0].choices["generate"]
    flags = {opt for action in gen._actions for opt in action.option_strings}
    for name in EngineConfig.model_fields:
        if name not in ("model", "plugins"):
            assert "--" + name.replace("_", "-") in flags
    assert "--disable-plugin" in flags and "--config" in flags


def test_generate_with_a_model_directory(tmp_path):
    path = make_tiny_model("MistralForCausalLM", tmp_path / "m")
    result = run_cli("generate", str(path), "--prompt", "Hello", "--prompt", "Bye", "--max-tokens", "5",
                     "--max-model-len", "128")  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [l for l in result.stdout.splitlines() if l.startswith("Prompt:")]
    assert len(lines) == 2 and "'Hello'" in lines[0] and "(length)" in lines[0]


def test_generate_without_a_model_uses_the_demo_model(tmp_path):
    env = dict(os.environ, FRAMEWORK_CACHE_DIR=str(tmp_path))
    result = run_cli("generate", "--prompt", "Hi", "--max-tokens", "3", env=env)
    assert result.returncode == 0, result.stderr
    assert "Prompt: 'Hi', Generated text:" in result.stdout
    assert "demo model" in result.stderr


def test_bad_settings_exit_with_a_clear_message(tmp_path):
    result = run_cli("generate", str(tmp_path), "--prompt", "x")
    assert result.returncode == 2 and "no config.json" in result.stderr
    result = run_cli("generate", "--block-size", "0")
    assert result.returncode == 2 and "block_size" in result.stderr
