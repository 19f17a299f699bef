"""CPU memory on transparent huge pages: weights and the KV cache live in 2 MiB-aligned arenas
advised with madvise(MADV_HUGEPAGE), so decode GEMVs and KV gathers take fewer TLB misses."""
from __future__ import annotations

import ctypes
import logging
import sys

import torch

logger = logging.getLogger(__name__)

_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def huge_page_bytes(num_bytes: int) -> torch.Tensor:
    """A CPU uint8 tensor of num_bytes, 2 MiB-aligned and advised for transparent huge pages.

    NOTE: decode streams every weight once per step; with 4 KiB pages that walk costs a TLB
    miss every 4 KiB, and measured ~15% of the GEMV time here (transformers, whose weights stay
    mmapped from the safetensors file, gets huge pages from the page cache). Linux only; where
    madvise is refused the memory is still usable, just with small pages."""
    raw = torch.empty(num_bytes + _HUGE_PAGE, dtype=torch.uint8)
    start = -raw.data_ptr() % _HUGE_PAGE
    arena = raw[start:start + num_bytes]
    if sys.platform.startswith("linux") and num_bytes >= _HUGE_PAGE:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            length = num_bytes - num_bytes % _HUGE_PAGE
            if libc.madvise(ctypes.c_void_p(arena.data_ptr()), ctypes.c_size_t(length), _MADV_HUGEPAGE):
                logger.debug("madvise(MADV_HUGEPAGE) refused (errno %d)", ctypes.get_errno())
        except (OSError, AttributeError) as exc:
            logger.debug("no madvise: %s", exc)
    return arena


def copy_to_huge_pages(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of CPU tensor t in its own huge-page arena (benchmarks place their
    weights the way the engine does)."""
    out = huge_page_bytes(t.numel() * t.element_size()).view(t.dtype).view(t.shape)
    return out.copy_(t)


@torch.no_grad()
def pack_on_huge_pages(module: torch.nn.Module) -> int:
    """Move every CPU parameter and buffer storage of `module` into one huge-page arena.

    Tensors that share a storage (tied embeddings, the q/k/v views of the fused weight) keep
    sharing it; each old storage is freed right after its copy, so the peak is the weights plus
    one storage. Returns the bytes moved; a module packed before is left alone (0): a second
    engine over the same in-memory model (bench/gpu_e2e.py) must not copy it again."""
    if getattr(module, "_packed_on_huge_pages", False):
        return 0
    tensors = [t for _, t in module.named_parameters()] + [t for _, t in module.named_buffers()]
    storages: dict[int, tuple[torch.UntypedStorage, list[torch.Tensor]]] = {}
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        storages.setdefault(storage.data_ptr(), (storage, []))[1].append(t)
    offsets, total = {}, 0
    for key, (storage, _) in storages.items():
        offsets[key] = total
        total += -(-storage.nbytes() // 64) * 64          # 64-byte aligned slots
    if total == 0:
        return 0
    arena = huge_page_bytes(total)
    arena_storage = arena.untyped_storage()
    base = arena.data_ptr() - arena_storage.data_ptr()  # byte offset of the arena in its storage
    # NOTE: pop each storage as it is moved: a reference kept here (as a plain loop over the dict
    # did) holds every old storage alive to the end, doubling the peak (a 7B model: 2 x 15 GiB).
    del tensors
    for key in list(storages):
        storage, users = storages.pop(key)
        start = base + offsets[key]
        arena[offsets[key]:offsets[key] + storage.nbytes()].copy_(
            torch.empty(0, dtype=torch.uint8).set_(storage))
        for t in users:
            elem = t.element_size()
            t.set_(arena_storage, start // elem + t.storage_offset(), t.size(), t.stride())
        del storage, users
    module._packed_on_huge_pages = True
    return total
