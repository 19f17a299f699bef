"""bench/device_env.sh, which the GPU scripts source: on a host where sparse-serve is not installed
(a lent GPU machine), it must make `sparse_serve.*` import from this checkout. Simulated with an
interpreter that skips site-packages (`python -S`), where the editable install lives."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _source_and_run(python: Path, code: str) -> subprocess.CompletedProcess:
    script = f'PY={python}; source bench/device_env.sh; "$PY" -c "{code}"'
    return subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_links_the_checkout_where_sparse_serve_is_not_installed(tmp_path):
    bare = tmp_path / "python"
    bare.write_text(f'#!/bin/sh\nexec {sys.executable} -S "$@"\n')
    bare.chmod(0o755)
    assert subprocess.run([bare, "-c", "import sparse_serve"], capture_output=True).returncode != 0
    done = _source_and_run(bare, "import sparse_serve.engine as e, sparse_serve.bench as b; "
                                 "print(list(e.__path__)[0]); print(list(b.__path__)[0])")
    assert done.returncode == 0, done.stderr
    engine_path, bench_path = done.stdout.splitlines()[-2:]
    assert Path(engine_path).resolve() == ROOT / "engine"
    assert Path(bench_path).resolve() == ROOT / "bench"
    assert "still does not import" not in done.stdout


def test_changes_nothing_where_it_is_installed():
    done = _source_and_run(Path(sys.executable), "import sparse_serve.engine")
    assert done.returncode == 0, done.stderr
    assert "linked in" not in done.stdout
