"""The one folder sparse-serve keeps what it builds or converts in (the native CPU kernel, the
embedded default model's HF folder): `$SPARSE_SERVE_CACHE`, else `$XDG_CACHE_HOME/sparse-serve`,
else `~/.cache/sparse-serve`."""
from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "SPARSE_SERVE_CACHE"


def cache_root() -> Path:
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "sparse-serve"
