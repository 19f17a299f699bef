# Sourced by the GPU scripts (bench/gpu_check.sh, bench/gpu_e2e.sh) after they set PY: makes this
# checkout importable as sparse_serve.* with the interpreter $PY on a host where it is not installed.
# A lent GPU machine is such a host: its python3 holds torch, triton and transformers but nothing of
# ours, no .venv travels (over the 64 MiB a run may carry) and nothing can be downloaded there.
#  - The package: a folder named sparse_serve in a temporary directory whose four entries link
#    server/, engine/, kernels/ and bench/ of this checkout (pyproject.toml's package-dir, as a
#    namespace package), put on PYTHONPATH.
#  - Packages that host lacks (the test suite's server side: fastapi, pydantic, uvicorn, ...):
#    wheels carried in .whl/ (made here by `bash bench/device_wheels.sh`; DEVICE_WHEELS names
#    another folder) are installed into a temporary folder, also put on PYTHONPATH. Without any
#    nothing is installed.
# Exported: PYTHONPATH. Works as a no-op where `import sparse_serve.engine` already succeeds.

device_env_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! "$PY" -c "import sparse_serve.engine" 2>/dev/null; then
    device_env_dir=$(mktemp -d -t sparse_serve_path.XXXXXX)
    mkdir "$device_env_dir/sparse_serve"
    for part in server engine kernels bench; do
        ln -s "$device_env_root/$part" "$device_env_dir/sparse_serve/$part"
    done
    export PYTHONPATH="$device_env_dir${PYTHONPATH:+:$PYTHONPATH}"
    echo "device_env: sparse_serve.* from $device_env_root (linked in $device_env_dir)"
fi
device_env_wheels=${DEVICE_WHEELS:-$device_env_root/.whl}
if compgen -G "$device_env_wheels/*.whl" >/dev/null; then
    device_env_site=$(mktemp -d -t sparse_serve_site.XXXXXX)
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$device_env_site" \
            "$device_env_wheels"/*.whl; then
        export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$device_env_site"
        echo "device_env: installed $(ls "$device_env_wheels"/*.whl | wc -l) carried wheels into $device_env_site"
    else
        echo "device_env: the carried wheels in $device_env_wheels did not install; the steps that need them will fail"
    fi
fi
"$PY" -c "import sparse_serve.engine" || echo "device_env: sparse_serve.engine still does not import"
