"""Write trained predictors as a model folder the server loads like TurboSparse's own.

The output folder links every file of the source folder (hard links where the filesystem
allows, else symbolic links: no weight is copied), adds `model-predictors.safetensors` with
`model.layers.{i}.mlp.predictor.fc1.weight` [r, H] / `fc2.weight` [I, r] in the checkpoint's
dtype, and writes a `model.safetensors.index.json` that lists the original tensors plus the
predictors (a predictor the source already had is replaced). `predictors.json` records how
they were trained and their held-out recall and precision.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from sparse_serve.engine.checkpoints.families import predictor_names
from sparse_serve.engine.checkpoints.loader import checkpoint_entries

PREDICTOR_SHARD = "model-predictors.safetensors"
INDEX = "model.safetensors.index.json"
REPORT = "predictors.json"


def _link(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:   # another filesystem, or links not allowed: point at the original
        target.symlink_to(source.resolve())


def write_predictor_folder(source: str | Path, out: str | Path,
                           predictors: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype,
                           report: dict) -> Path:
    source, out = Path(source), Path(out)
    if out.resolve() == source.resolve():
        raise ValueError(f"--out must differ from the model folder ({source})")
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty")
    entries = checkpoint_entries(source)
    out.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():
        if item.name in (INDEX, PREDICTOR_SHARD, REPORT) or not item.is_file():
            continue
        _link(item, out / item.name)
    names = {n for i in range(len(predictors)) for n in predictor_names(i)}
    weight_map = {name: entry.path.name for name, entry in entries.items() if name not in names}
    tensors = {}
    for i, (fc1, fc2) in enumerate(predictors):
        fc1_name, fc2_name = predictor_names(i)
        tensors[fc1_name] = fc1.to(dtype).contiguous()
        tensors[fc2_name] = fc2.to(dtype).contiguous()
    save_file(tensors, str(out / PREDICTOR_SHARD), metadata={"format": "pt"})
    os.chmod(out / PREDICTOR_SHARD, 0o644)   # NOTE: an ordinary shared file, like the shards beside it
    weight_map.update({name: PREDICTOR_SHARD for name in tensors})
    total = sum(e.num_bytes for n, e in entries.items() if n not in names)
    total += sum(t.numel() * t.element_size() for t in tensors.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                         "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (out / REPORT).write_text(json.dumps(report, indent=2) + "\n")
    return out
