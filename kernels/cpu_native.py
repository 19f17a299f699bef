"""Builds and loads the small native CPU kernels: the sparse FFN (kernels/csrc/sparse_ffn_cpu.cpp),
the paged-attention decode (kernels/csrc/paged_attention_cpu.cpp), the int8 linear
(kernels/csrc/linear_int8_cpu.cpp, int8 or 4-bit rows) and the int8 decode step through all layers
(kernels/csrc/decode_layers_cpu.cpp), one shared library.

NOTE: a plain shared library loaded with ctypes, not a torch C++ extension: it includes no torch
headers, so it compiles in a few seconds with the system g++ on first use (which `make test`
triggers) instead of a minute of torch-header compilation, and needs no ninja. Tensors cross the
boundary as raw data pointers; the launcher in kernels/sparse_ffn_cpu.py checks their layout.
If no compiler is available the build fails once, is logged, and callers fall back to torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

from sparse_serve.kernels.cache import cache_root

logger = logging.getLogger(__name__)

_SOURCES = [Path(__file__).parent / "csrc" / name for name in ("sparse_ffn_cpu.cpp", "paged_attention_cpu.cpp",
                                                                   "linear_int8_cpu.cpp", "decode_layers_cpu.cpp")]
# Headers the sources include: they enter the build key, not the command line.
_HEADERS = [Path(__file__).parent / "csrc" / name for name in ("int8_rows.h", "int4_rows.h", "sparse_ffn_i8_batch.h")]
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_failed = False


def _cache_dir() -> Path:
    return cache_root() / "native"


def _library_path() -> Path:
    # The key covers the source, the flags and the host CPU (-march=native output is host-specific).
    key = hashlib.sha256()
    for source in (*_SOURCES, *_HEADERS):
        key.update(source.read_bytes())
    key.update(" ".join(_FLAGS).encode())
    key.update(platform.machine().encode())
    try:
        key.update(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].encode())
    except (OSError, IndexError):
        pass
    return _cache_dir() / f"sparse_ffn_cpu_{key.hexdigest()[:16]}.so"


def _build(target: Path) -> None:
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise RuntimeError("no C++ compiler (g++) found")
    target.parent.mkdir(parents=True, exist_ok=True)
    # NOTE: build to a temporary name and rename, so concurrent processes never load a half
    # written library.
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".so", delete=False) as tmp:
        tmp_path = Path(tmp.name)
    try:
        cmd = [compiler, *_FLAGS, *map(str, _SOURCES), "-o", str(tmp_path)]
        logger.info("building native sparse FFN kernel: %s", " ".join(cmd))
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            raise RuntimeError(f"g++ failed ({result.returncode}): {result.stderr[-2000:]}")
        os.replace(tmp_path, target)
        # Builds of older sources are dead weight once the source changed.
        for stale in target.parent.glob("sparse_ffn_cpu_*.so"):
            if stale != target:
                stale.unlink(missing_ok=True)
    finally:
        tmp_path.unlink(missing_ok=True)


def _declare(lib: ctypes.CDLL) -> None:
    p, i64, c_int, c_float = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.sparse_ffn_cpu.argtypes = [p, p, p, p, p, p, p, p, p, p, p, p, p, i64, i64, i64, c_int, c_float,
                                   c_int, c_int, c_int]
    lib.sparse_ffn_cpu.restype = c_int
    lib.linear_cpu.argtypes = [p, p, p, p, i64, i64, i64, c_int, c_int]
    lib.linear_cpu.restype = c_int
    lib.paged_attention_decode_cpu.argtypes = [p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, c_float, i64,
                                               c_int]
    lib.paged_attention_decode_cpu.restype = c_int
    lib.linear_int8_cpu.argtypes = [p, p, p, p, i64, i64, i64, c_int, c_int, c_int, c_int]
    lib.linear_int8_cpu.restype = c_int
    lib.int8_rows_x_max.argtypes = [i64, c_int]
    lib.int8_rows_x_max.restype = c_int
    lib.decode_layers_cpu.argtypes = [p, p, p, p, p, p, p, i64, i64, i64, i64, i64, i64, i64, i64, i64, c_float,
                                      c_float, i64, c_int, c_int, c_int, p, p, c_int]
    lib.decode_layers_cpu.restype = c_int
    lib.sparse_ffn_cpu_max_batch.argtypes = []
    lib.sparse_ffn_cpu_max_batch.restype = c_int
    for name in ("sparse_ffn_cpu_prefetches", "sparse_ffn_cpu_row_chunk"):
        getattr(lib, name).argtypes = []
        getattr(lib, name).restype = c_int


def load() -> ctypes.CDLL | None:
    """The loaded library, building it on first use; None if it cannot be built here."""
    global _lib, _failed
    if _lib is not None or _failed:
        return _lib
    with _lock:
        if _lib is not None or _failed:
            return _lib
        if os.environ.get("SPARSE_SERVE_NO_NATIVE") == "1":
            _failed = True
            return None
        try:
            path = _library_path()
            if not path.exists():
                _build(path)
            lib = ctypes.CDLL(str(path))
            _declare(lib)
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            logger.warning("native CPU sparse FFN unavailable, using the torch path: %s", exc)
            _failed = True
    return _lib


def available() -> bool:
    return load() is not None
