"""Read safetensors files without mapping them: headers alone, then each tensor straight into
the storage of the parameter that will hold it.

NOTE: `safe_open(...).get_tensor` memory-maps the shard, and every page it touches counts in
the process's RSS until the file is closed, so loading a 4 GB shard that way costs 4 GB of RSS
on top of the model. Reading each tensor's bytes with `readinto` into the parameter itself
(or, when dtype or device differ, into one temporary the size of that tensor) keeps the peak
at about the model's own size plus its largest tensor (bench/mistral7b_load.py measures it).

File layout: 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, then the
data; offsets count from the end of the header.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from sparse_serve.engine.core.errors import ModelLoadError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
# NOTE: a header larger than this is not a real checkpoint (the format caps it at 100 MB).
MAX_HEADER_BYTES = 100 * 2**20


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype name ("BF16"), shape and absolute byte range."""
    path: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def torch_dtype(self) -> torch.dtype:
        return SAFETENSORS_DTYPES[self.dtype]

    @property
    def num_bytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> dict[str, TensorEntry]:
    """Every tensor of one safetensors file, from its header alone (nothing else is read).
    ModelLoadError naming the file when it is missing, truncated or not safetensors."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: safetensors shard listed in the index is missing")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise ValueError("shorter than the 8-byte header length")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(f.read(header_len))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file ({exc})") from exc
    if not isinstance(header, dict):
        raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file (header is not an object)")
    data_start = 8 + header_len
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as exc:
            raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file "
                                 f"(bad header entry for {name!r}: {exc})") from exc
        if dtype not in SAFETENSORS_DTYPES:
            raise ModelLoadError(f"{path}: tensor {name!r} has dtype {dtype}, which sparse-serve "
                                 f"cannot load (supported: {', '.join(SAFETENSORS_DTYPES)})")
        expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        if end - begin != expected or data_start + end > size:
            raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file ({name!r} spans "
                                 f"bytes {begin}..{end}, which does not fit its shape or the file)")
        entries[name] = TensorEntry(path, dtype, shape, data_start + begin, data_start + end)
    return entries


def read_into(entry: TensorEntry, target: torch.Tensor, name: str) -> None:
    """Copy one tensor from its file into `target` (any device and float dtype, same shape)."""
    if tuple(target.shape) != entry.shape:
        raise ModelLoadError(f"{entry.path}: tensor {name!r} has shape {entry.shape}, "
                             f"config.json implies {tuple(target.shape)}")
    direct = (target.device.type == "cpu" and target.dtype == entry.torch_dtype
              and target.is_contiguous())
    buffer = target if direct else torch.empty(entry.shape, dtype=entry.torch_dtype)
    if buffer.numel():
        raw = buffer.view(-1).view(torch.uint8).numpy()    # the tensor's own bytes, writable
        try:
            with open(entry.path, "rb", buffering=0) as f:
                f.seek(entry.start)
                view, done = memoryview(raw), 0
                while done < entry.num_bytes:
                    got = f.readinto(view[done:])
                    if not got:
                        raise OSError(f"file ends {entry.num_bytes - done} bytes early")
                    done += got
        except OSError as exc:
            raise ModelLoadError(f"{entry.path}: corrupt or unreadable safetensors file "
                                 f"(reading {name!r}: {exc})") from exc
    if not direct:
        target.copy_(buffer)
