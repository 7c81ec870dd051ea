"""`framework serve` flags: derived from EngineConfig and ServerConfig; --config files mix both."""

import subprocess
import sys

import yaml

from framework.config import EngineConfig
from framework.entrypoints.cli import build_parser
from framework.entrypoints.openai.cli_args import ServerConfig, configs_from_args


def _serve_flags() -> set[str]:
    serve = build_parser()._subparsers._group_actions[0].choices["serve"]
    return {opt for action in serve._actions for opt in action.option_strings}


def test_every_engine_and_server_setting_is_a_kebab_case_flag():
    flags = _serve_flags()
    for name in list(EngineConfig.model_fields) + list(ServerConfig.model_fields):
        if name not in ("model", "plugins"):
            assert "--" + name.replace("_", "-") in flags, name
    assert {"--config", "--disable-plugin", "--host", "--port", "--api-key", "--served-model-name",
            "--chat-template", "--max-queued-requests", "--shutdown-timeout"} <= flags  # fmt: skip


def test_defaults_and_several_model_names(monkeypatch):
    monkeypatch.delenv("FRAMEWORK_API_KEY", raising=False)
    engine, server = configs_from_args(build_parser().parse_args(["serve", "m", "--served-model-name", "a", "b"]))
    assert engine.model == "m" and server.served_model_name == ["a", "b"]
    assert (server.host, server.port, server.api_key, server.max_queued_requests) == ("127.0.0.1", 8000, None, None)


def test_config_file_mixes_engine_and_server_keys_and_flags_win(tmp_path, monkeypatch):
    monkeypatch.setenv("FRAMEWORK_API_KEY", "from-env")
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "max_model_len": 64, "port": 9000, "max_queued_requests": 3}))
    args = build_parser().parse_args(["serve", "--config", str(path), "--port", "9001", "--block-size", "8"])
    engine, server = configs_from_args(args)
    assert (engine.model, engine.max_model_len, engine.block_size) == ("m", 64, 8)
    assert (server.port, server.max_queued_requests, server.api_key) == (9001, 3, "from-env")
    args = build_parser().parse_args(["serve", "--config", str(path), "--api-key", "from-flag"])
    assert configs_from_args(args)[1].api_key == "from-flag"


def test_bad_settings_exit_with_a_clear_message(tmp_path):
    def serve(*args):
        return subprocess.run([sys.executable, "-m", "framework", "serve", *args], capture_output=True, text=True,
                              timeout=120)  # fmt: skip

    result = serve(str(tmp_path))
    assert result.returncode == 2 and "no config.json" in result.stderr
    result = serve("--port", "70000")
    assert result.returncode == 2 and "port" in result.stderr
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"prot": 1}))
    result = serve("--config", str(tmp_path / "bad.yaml"))
    assert result.returncode == 2 and "prot" in result.stderr
