"""Our folders are importable as sparse_serve.* only: a bare `kernels` is Hugging Face's package
(transformers imports it), and bare `engine` / `server` find nothing, from every entry point,
even when the current directory is the repository root."""
from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {"server": "sparse_serve.server", "engine": "sparse_serve.engine",
           "kernels": "sparse_serve.kernels", "bench": "sparse_serve.bench"}

# Prints where each bare name resolves (None: nowhere), after whatever ran before it.
PROBE = """
import importlib.util, json
def origin(name):
    spec = importlib.util.find_spec(name)
    return None if spec is None else (spec.origin or list(spec.submodule_search_locations or ()))
print("PROBE" + json.dumps({name: origin(name) for name in ("kernels", "engine", "server")}))
"""


def hf_kernels_origin() -> str:
    dist = metadata.distribution("kernels")      # installed on purpose by the test extra
    return str(dist.locate_file("kernels/__init__.py"))


def run_probe(args: list[str], cwd: Path = REPO) -> dict:
    out = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(line for line in out.stdout.splitlines() if line.startswith("PROBE"))
    return json.loads(line[len("PROBE"):])


def assert_not_ours(where: dict) -> None:
    assert where["engine"] is None and where["server"] is None, where
    assert where["kernels"] == hf_kernels_origin(), where
    for folder in FOLDERS:
        assert str(REPO / folder) not in json.dumps(where), where


def test_hugging_face_kernels_is_installed_and_is_not_ours():
    assert Path(hf_kernels_origin()).is_file()
    assert not Path(hf_kernels_origin()).is_relative_to(REPO / "kernels")


def test_this_test_process_sees_no_bare_names():
    """pytest itself (make test) runs with -P and no `pythonpath`: the root is not on sys.path."""
    assert importlib.util.find_spec("engine") is None and importlib.util.find_spec("server") is None
    assert importlib.util.find_spec("kernels").origin == hf_kernels_origin()


def test_python_dash_p_from_the_repository_root():
    """What `make serve` / `make test` / `make bench` run: python -P."""
    assert_not_ours(run_probe(["-P", "-c", PROBE]))


def test_python_dash_m_server_from_the_repository_root():
    """`python -m sparse_serve.server` (no -P) from the root: its __main__ drops the current
    directory before anything imports transformers."""
    # NOTE: -P, then the current directory first: the sys.path that `python -m` starts with.
    code = ("import os, runpy, sys; sys.path.insert(0, os.getcwd()); sys.argv = ['sparse-serve', '--help']\n"
            "try:\n    runpy.run_module('sparse_serve.server', run_name='__main__', alter_sys=True)\n"
            "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n" + PROBE)
    assert_not_ours(run_probe(["-P", "-c", code]))
    out = subprocess.run([sys.executable, "-m", "sparse_serve.server", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "serve" in out.stdout, out.stderr[-2000:]


@pytest.mark.parametrize("script", sorted(p.name for p in (REPO / "bench").glob("*.py") if p.name != "__init__.py"))
def test_bench_scripts_leave_bare_names_alone(script):
    """`python bench/X.py` puts bench/ first on sys.path: nothing there may shadow a package,
    and no script may put the repository root on sys.path."""
    assert Path(script).stem not in ("kernels", "engine", "server", "transformers", "torch")
    source = (REPO / "bench" / script).read_text()
    assert "sys.path" not in source
    code = ("import runpy, sys; sys.path.insert(0, 'bench'); "
            f"runpy.run_path('bench/{script}', run_name='probe')\n" + PROBE)
    assert_not_ours(run_probe(["-P", "-c", code]))


def test_console_script_and_make_targets_use_the_namespace():
    scripts = {ep.name: ep.value for ep in metadata.entry_points(group="console_scripts")}
    assert scripts["sparse-serve"] == "sparse_serve.server.cli:main"
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^RUN := \$\(PY\) -P$", makefile, re.M)
    for target in ("serve", "test", "bench"):
        recipe = re.search(rf"^{target}: .*\n\t(.*)$", makefile, re.M).group(1)
        assert recipe.startswith("$(RUN) "), (target, recipe)


def test_docker_images_import_the_namespace_only():
    for dockerfile in ("Dockerfile", "Dockerfile.cpu"):
        text = (REPO / "docker" / dockerfile).read_text()
        assert "PYTHONSAFEPATH=1" in re.search(r"^ENV (?:.*\\\n)*.*$", text, re.M).group(0)
        imports = re.findall(r'python -c "import ([^;"]+)', text)
        assert imports, dockerfile
        for line in imports:
            names = [name.strip() for name in line.split(",")]
            assert "sparse_serve.server.cli" in names and not {"engine", "kernels", "server"} & set(names), line
        assert "-r requirements.lock" in text or "requirements.lock > " in text


def test_every_folder_is_packaged_under_sparse_serve():
    """pyproject's explicit package list covers each folder of server/ engine/ kernels/ bench/
    (a new room that is missing would be absent from a wheel)."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert tool["package-dir"] == {new: old for old, new in FOLDERS.items()}
    expected = set()
    for old, new in FOLDERS.items():
        for folder in [REPO / old, *(REPO / old).rglob("*")]:
            if folder.is_dir() and folder.name != "__pycache__":
                rel = folder.relative_to(REPO / old).parts
                expected.add(".".join((new, *rel)))
    assert set(tool["packages"]) == expected
