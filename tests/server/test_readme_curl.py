"""The README's curl examples, run as written against a live server.

Every fenced shell block in README.md that starts with a curl call on localhost:8000 is run
with bash, the port swapped for the live server's; each must exit 0 and print an OpenAI-shaped
answer (JSON without an error, or an SSE stream ending in [DONE]).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.server.conftest import small_config

README = Path(__file__).resolve().parents[2] / "README.md"
_FENCE = re.compile(r"```(?:bash|sh|shell|console)?\n(.*?)```", re.DOTALL)
_HOST = re.compile(r"(?:localhost|127\.0\.0\.1):8000")
_MODEL = re.compile(r'"model"\s*:\s*"([^"]+)"')


def readme_curl_commands() -> list[str]:
    """Fenced shell blocks that start with a curl call on localhost:8000, each run whole
    (a JSON body may span several lines inside quotes)."""
    if not README.is_file():
        return []
    commands = []
    for block in _FENCE.findall(README.read_text()):
        lines = [line.removeprefix("$ ") for line in block.strip().splitlines()
                 if line.strip() and not line.lstrip().startswith("#")]
        if lines and lines[0].startswith("curl ") and _HOST.search(lines[0]):
            commands.append("\n".join(lines))
    return commands


COMMANDS = readme_curl_commands()


@pytest.fixture
def engine_config():
    # NOTE: serve under the name the README uses, so its examples run unedited.
    names = {m for c in COMMANDS for m in _MODEL.findall(c)}
    return small_config(**({"model.served_model_name": names.pop()} if len(names) == 1 else {}))


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
@pytest.mark.skipif(not COMMANDS, reason="README.md has no curl examples against localhost:8000 yet")
@pytest.mark.parametrize("command", COMMANDS)
def test_readme_curl_example(command, live_server):
    runnable = _HOST.sub(f"127.0.0.1:{live_server.port}", command)
    out = subprocess.run(["bash", "-c", runnable], capture_output=True, text=True, timeout=60,
                         env={"PATH": "/usr/bin:/bin", "OPENAI_API_KEY": "unused"})
    assert out.returncode == 0, out.stderr
    body = out.stdout.strip()
    if body.startswith("data: "):
        assert body.endswith("data: [DONE]")
    else:
        answer = json.loads(body)
        assert "error" not in answer, answer
