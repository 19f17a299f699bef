"""Reliability tests: overload, disconnect storms, soak, shutdown, auth, against a real server.

Every test serves a tiny random model on 127.0.0.1 only, bounds each client with a timeout and
each test with pytest-timeout, and stops by itself. The default run of this folder takes about a
minute on two cores.

SPARSE_SERVE_RELIABILITY_LONG=1 raises the counts (more clients, waves and soak requests: the
soak goes from 150 to 1,000 requests), for a nightly run or before a release:

    SPARSE_SERVE_RELIABILITY_LONG=1 .venv/bin/python -P -m pytest -q tests/reliability
"""
from __future__ import annotations

import os

LONG = os.environ.get("SPARSE_SERVE_RELIABILITY_LONG", "") not in ("", "0")
TEST_TIMEOUT_S = 900 if LONG else 120     # per test, enforced by pytest-timeout


def scaled(default: int, long: int) -> int:
    """A count for this run: `long` under SPARSE_SERVE_RELIABILITY_LONG=1, else `default`."""
    return long if LONG else default
