"""Calibration and held-out text that needs no download: the standard library's docstrings.

Every docstring of a fixed list of pure-Python stdlib modules (module, public classes, their
methods, public functions) is collected, cleaned and de-duplicated, then assigned to one split by
a stable hash of its text, so the calibration and held-out sets are disjoint by construction and
the same on every machine running the same Python version.

NOTE: docstrings change between Python releases, so absolute perplexities are comparable only
between runs on the same interpreter version (the bench records it).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
import logging
import warnings
from collections.abc import Iterable, Sequence

import torch

logger = logging.getLogger(__name__)

SPLITS = ("calibration", "heldout")
# Roughly one docstring in four goes to the held-out set.
HELDOUT_BUCKETS = 4
MIN_DOC_CHARS = 120
STDLIB_MODULES = (
    "argparse", "ast", "asyncio.base_events", "asyncio.streams", "base64", "bisect", "calendar",
    "collections", "concurrent.futures._base", "configparser", "contextlib", "copy", "csv",
    "dataclasses", "datetime", "decimal", "difflib", "email.message", "email.utils", "enum",
    "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip", "heapq",
    "hmac", "html.parser", "http.client", "http.cookiejar", "http.server", "imaplib", "inspect",
    "ipaddress", "json", "json.decoder", "json.encoder", "locale", "logging", "logging.handlers",
    "mailbox", "mimetypes", "multiprocessing.pool", "netrc", "ntpath", "numbers", "operator",
    "optparse", "os", "pathlib", "pdb", "pickle", "pkgutil", "platform", "poplib", "posixpath",
    "pprint", "pydoc", "queue", "quopri", "random", "re", "reprlib", "sched", "secrets",
    "selectors", "shelve", "shlex", "shutil", "smtplib", "socket", "socketserver", "sqlite3",
    "ssl", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap", "threading",
    "timeit", "tokenize", "trace", "traceback", "types", "typing", "unittest.case",
    "unittest.mock", "urllib.parse", "urllib.request", "uuid", "warnings", "wave", "weakref",
    "xml.dom.minidom", "xml.etree.ElementTree", "zipfile", "zoneinfo._zoneinfo",
)


def _docstrings_of(module_name: str) -> list[str]:
    # NOTE: touching deprecated aliases (typing.io, ...) warns; these are only being read.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return list(_walk_docstrings(module_name))


def _walk_docstrings(module_name: str) -> Iterable[str]:
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:   # NOTE: a platform may lack a module (e.g. no _ssl); skip it
        logger.debug("calibration data: skipping %s (%s)", module_name, exc)
        return
    yield module.__doc__ or ""
    for name, obj in sorted(vars(module).items()):
        if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
            continue
        if inspect.isclass(obj):
            yield obj.__doc__ or ""
            for attr, member in sorted(vars(obj).items()):
                if not attr.startswith("_") and inspect.isfunction(member):
                    yield member.__doc__ or ""
        elif inspect.isfunction(obj):
            yield obj.__doc__ or ""


def split_of(text: str) -> str:
    bucket = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") % HELDOUT_BUCKETS
    return "heldout" if bucket == 0 else "calibration"


def stdlib_docstrings(split: str, modules: Sequence[str] = STDLIB_MODULES) -> list[str]:
    """Unique cleaned docstrings of at least MIN_DOC_CHARS characters in one split, in a
    deterministic order (by module, then by name)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [text for text in _all_docstrings(tuple(modules)) if split_of(text) == split]


@functools.lru_cache(maxsize=4)
def _all_docstrings(modules: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, None] = {}   # NOTE: a dict keeps first-seen order, a set would not
    for module_name in modules:
        for raw in _docstrings_of(module_name):
            text = inspect.cleandoc(raw).strip()
            if len(text) >= MIN_DOC_CHARS:
                seen.setdefault(text, None)
    return tuple(seen)


def token_windows(encode, texts: Sequence[str], window: int, max_windows: int,
                  bos_token_id: int | None = None) -> list[torch.Tensor]:
    """Concatenate texts (blank line between them), tokenize, and cut into non-overlapping
    windows of `window` tokens (each starting with BOS when the model has one).

    encode: text -> list[int] without special tokens. Returns up to max_windows int64 tensors.
    """
    body = window - (1 if bos_token_id is not None else 0)
    windows: list[torch.Tensor] = []
    buffer: list[int] = []
    for text in texts:
        buffer.extend(encode(text + "\n\n"))
        while len(buffer) >= body and len(windows) < max_windows:
            ids = ([bos_token_id] if bos_token_id is not None else []) + buffer[:body]
            windows.append(torch.tensor(ids, dtype=torch.long))
            buffer = buffer[body:]
        if len(windows) >= max_windows:
            break
    if len(windows) < max_windows:
        logger.warning("calibration data: only %d windows of %d tokens available (asked for %d)",
                       len(windows), window, max_windows)
    return windows


def load_windows(tokenizer, split: str, window: int, max_windows: int) -> list[torch.Tensor]:
    """Token windows of one split for a sparse_serve.engine.text.tokenizer.Tokenizer."""
    texts = stdlib_docstrings(split)
    plain = tokenizer.encode("a", add_special_tokens=False)
    # NOTE: prepend BOS only for tokenizers that add it themselves (Llama-2 style); SmolLM2's
    # bos token is a chat marker its tokenizer never adds to plain text.
    adds_bos = len(tokenizer.encode("a", add_special_tokens=True)) > len(plain)
    return token_windows(lambda t: tokenizer.encode(t, add_special_tokens=False), texts, window,
                         max_windows, tokenizer.bos_token_id if adds_bos else None)
