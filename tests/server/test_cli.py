"""The sparse-serve command line: flags onto the config tree, subcommand dispatch."""
from __future__ import annotations

import subprocess
import sys
import types
from pathlib import Path

import pytest

from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.server import cli

REPO = Path(__file__).resolve().parents[2]


def load(argv: list[str], environ: dict[str, str] | None = None) -> EngineConfig:
    args = cli.build_parser().parse_args(["serve", *argv])
    return EngineConfig.load(*args.config, overrides=cli.config_overrides(args, environ or {}))


def test_defaults_come_from_yaml():
    config = load([])
    assert config.model.path is None               # the embedded default model
    assert config.server.host == "127.0.0.1" and config.server.port == 8000
    assert config.server.api_keys == [] and config.server.allowed_origins == []
    assert config.cache.enable_prefix_caching is True


def test_every_flag_lands_in_the_config(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("scheduler:\n  max_num_seqs: 3\nserver:\n  port: 9001\n")
    config = load([
        "--model", "/models/m", "--config", str(extra), "--host", "0.0.0.0", "--port", "9100",
        "--api-key", "k1", "--api-key", "k2", "--served-model-name", "m-name",
        "--chat-template", "t.jinja", "--sparsity", "s.json", "--dtype", "bfloat16", "--device", "cuda",
        "--max-model-len", "4096", "--max-num-seqs", "12", "--max-num-batched-tokens", "1024",
        "--kv-cache-bytes", "2GiB", "--block-size", "32", "--no-prefix-caching",
        "--allowed-origins", "https://a.example", "https://b.example", "--log-level", "debug",
    ])
    assert config.model.path == "/models/m"
    assert config.model.served_model_name == "m-name"
    assert config.model.chat_template == "t.jinja" and config.model.sparsity_file == "s.json"
    assert config.model.dtype == "bfloat16" and config.model.device == "cuda"
    assert config.model.max_model_len == 4096
    assert config.scheduler.max_num_seqs == 12                # the flag beats the YAML file
    assert config.scheduler.max_num_batched_tokens == 1024
    assert config.cache.kv_cache_bytes == 2 * 2**30 and config.cache.block_size == 32
    assert config.cache.enable_prefix_caching is False
    assert config.server.host == "0.0.0.0" and config.server.port == 9100
    assert config.server.api_keys == ["k1", "k2"]
    assert config.server.allowed_origins == ["https://a.example", "https://b.example"]
    assert config.server.log_level == "debug"


def test_yaml_value_kept_when_flag_absent(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("server:\n  port: 9001\n")
    assert load(["--config", str(extra)]).server.port == 9001


def test_api_keys_from_environment():
    assert load([], {cli.API_KEYS_ENV: "a, b,"}).server.api_keys == ["a", "b"]
    assert load(["--api-key", "c"], {cli.API_KEYS_ENV: "a"}).server.api_keys == ["c"]


@pytest.mark.parametrize("text, expected", [("1024", 1024), ("2GiB", 2 * 2**30), ("512MB", 512 * 10**6),
                                            ("1.5gib", int(1.5 * 2**30)), ("64k", 64000)])
def test_parse_bytes(text, expected):
    assert cli.parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "5 parsecs", "-1"])
def test_parse_bytes_rejects(text):
    with pytest.raises(Exception):
        cli.parse_bytes(text)


def test_bad_config_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--config", "/no/such.yaml"])
    assert exc.value.code == 2
    assert "config file not found" in capsys.readouterr().err


@pytest.mark.parametrize("command, module, function", [
    ("convert", "sparse_serve.engine.checkpoints.convert_gguf", "main_convert"),
    ("calibrate", "sparse_serve.engine.calibration.calibrate", "main_calibrate"),
])
def test_subcommands_hand_over_their_arguments(monkeypatch, command, module, function):
    seen = []
    fake = types.ModuleType(module)
    setattr(fake, function, lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(sys.modules, module, fake)
    assert cli.main([command, "--in", "x.gguf", "--help"]) == 0
    assert seen == [["--in", "x.gguf", "--help"]]


def test_serve_hands_the_config_to_serve(monkeypatch):
    captured = {}

    def fake_serve(config: EngineConfig) -> int:
        captured["config"] = config
        return 0

    monkeypatch.setattr(cli, "serve", fake_serve)
    monkeypatch.setattr(cli, "configure_logging", lambda level: None)
    assert cli.main(["serve", "--port", "9123", "--max-num-seqs", "2"]) == 0
    assert captured["config"].server.port == 9123
    assert captured["config"].scheduler.max_num_seqs == 2


def test_python_dash_m_server_help():
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    for flag in ("--model", "--api-key", "--allowed-origins", "--no-prefix-caching", "--kv-cache-bytes"):
        assert flag in out.stdout
