#!/usr/bin/env bash
# Downloads, here (where the package registries are reachable), the wheels a lent GPU machine needs
# beyond its own image to run bench/gpu_check.sh and bench/gpu_e2e.sh: the packages that the test
# suite's conftest imports (the HTTP server side) and that image lacks, at this project's locked
# versions, built for the image's Python (3.12, x86-64 Linux). They go to .whl/ (ignored by git),
# which a device run carries (carry: [".whl"]) and bench/device_env.sh installs there.
# The image's packages (torch, triton, transformers, tokenizers, safetensors, numpy, jinja2, httpx,
# anyio, pytest, ...) are used as they are: the list is the image's package list
# (/work/.library/device/KINDS.md) against requirements*.lock, trimmed to what our imports reach.
# typing-extensions too, though that image has one: pydantic wants >= 4.16, newer than the image may
# hold, and a newer one on PYTHONPATH serves torch as well.
# Usage, from the repository root:  bash bench/device_wheels.sh [PYTHON_VERSION]   (default 3.12)
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${1:-3.12}
PIP=${PIP:-.venv/bin/python -m pip}
NEEDED="fastapi starlette pydantic pydantic-core annotated-types typing-inspection uvicorn opentelemetry-api typing-extensions"
specs=()
for name in $NEEDED; do
    spec=$(grep -ihE "^${name}==" requirements.lock requirements.test.lock | head -1 | awk '{print $1}')
    [ -n "$spec" ] || { echo "device_wheels: $name is not in the lock files" >&2; exit 1; }
    specs+=("$spec")
done
rm -rf .whl && mkdir .whl
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do platforms+=(--platform "$p"); done
# shellcheck disable=SC2086
$PIP download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
    "${platforms[@]}" -d .whl "${specs[@]}"
ls .whl
du -sh .whl
