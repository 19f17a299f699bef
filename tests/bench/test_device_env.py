"""bench/device_env.sh, which the GPU scripts source: on a host where sparse-serve is not installed
(a lent GPU machine), it must make `sparse_serve.*` import from this checkout, and it must install
the wheels carried for that host. The missing install is simulated with an interpreter that skips
site-packages (`python -S`), where the editable install lives."""
from __future__ import annotations

import base64
import hashlib
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _source_and_run(python: Path, code: str, tmp: Path, env: str = "") -> subprocess.CompletedProcess:
    # set -u as the GPU scripts run it, and no PYTHONPATH: an unset variable must not stop it;
    # TMPDIR: its temporary folders go under the test's own
    script = (f'set -uo pipefail; unset PYTHONPATH; export TMPDIR={tmp}; {env} PY={python}; '
              f'source bench/device_env.sh; "$PY" -c "{code}"')
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          check=False)


def _wheel(folder: Path, module: str, text: str) -> Path:
    """A minimal pure-Python wheel holding one module (what pip needs: METADATA, WHEEL, RECORD)."""
    name, version = module.replace("_", "-"), "1.0"
    dist_info = f"{module}-{version}.dist-info"
    files = {f"{module}.py": text,
             f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, content in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(content.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(content.encode())}")
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    path = folder / f"{module}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name_in_zip, content in files.items():
            wheel.writestr(name_in_zip, content)
    return path


def test_links_the_checkout_where_sparse_serve_is_not_installed(tmp_path):
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    assert subprocess.run([bare, "-c", "import sparse_serve"], capture_output=True, check=False).returncode != 0
    done = _source_and_run(bare, "import sparse_serve.engine as e, sparse_serve.bench as b; "
                                 "print(list(e.__path__)[0]); print(list(b.__path__)[0])", tmp_path,
                           env=f"DEVICE_WHEELS={tmp_path / 'none'};")
    assert done.returncode == 0, done.stderr
    engine_path, bench_path = done.stdout.splitlines()[-2:]
    assert Path(engine_path).resolve() == ROOT / "engine"
    assert Path(bench_path).resolve() == ROOT / "bench"
    assert "still does not import" not in done.stdout


def test_installs_carried_wheels_and_leaves_an_installed_package_alone(tmp_path):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "device_env_probe", "ANSWER = 42\n")
    done = _source_and_run(Path(sys.executable), "import device_env_probe, sparse_serve.engine as e; "
                                                 "print(device_env_probe.ANSWER)", tmp_path,
                           env=f"DEVICE_WHEELS={wheels};")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "42"
    assert "installed 1 carried wheels" in done.stdout
    assert "linked in" not in done.stdout                      # installed: nothing linked
    assert [p.name.split(".")[0] for p in tmp_path.glob("sparse_serve_*")] == ["sparse_serve_site"]
