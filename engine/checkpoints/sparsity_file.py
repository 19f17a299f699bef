"""The calibrated-sparsity sidecar: per-layer activation thresholds for a SwiGLU model.

Written by `sparse-serve calibrate`, read by the loader when `model.sparsity_file` is set
(`--sparsity FILE`). Layout (JSON):

    {"format": "sparse-serve-sparsity/1", "model": "SmolLM2-135M-Instruct-...", "act": "silu",
     "num_layers": 30, "intermediate_size": 1536, "target_sparsity": 0.5, "method": "greedy",
     "thresholds": [per layer], "layer_sparsity": [measured per layer on the calibration set],
     "calibration": {"data": ..., "num_tokens": ..., ...}}

A threshold t > 0 on layer l means CATS: neuron i is inactive for a token iff |silu(g_i)| <= t.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sparse_serve.engine.core.errors import ModelLoadError

FORMAT = "sparse-serve-sparsity/1"
METHODS = ("greedy", "uniform")
# Activations whose threshold means "|act(gate)| below it is zero". fatrelu has its own
# config-level threshold and ReLU-family models are sparse already.
THRESHOLD_ACTS = ("silu",)


@dataclass
class SparsityFile:
    model: str
    act: str
    target_sparsity: float
    method: str
    thresholds: list[float]
    layer_sparsity: list[float]
    num_layers: int | None = None
    intermediate_size: int | None = None
    calibration: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT

    def validate(self, source: str = "sparsity file") -> None:
        if self.format != FORMAT:
            raise ModelLoadError(f"{source}: format {self.format!r} is not {FORMAT!r}")
        if self.act not in THRESHOLD_ACTS:
            raise ModelLoadError(f"{source}: activation {self.act!r} cannot be thresholded "
                                 f"(supported: {', '.join(THRESHOLD_ACTS)})")
        if self.method not in METHODS:
            raise ModelLoadError(f"{source}: method {self.method!r} is not one of {METHODS}")
        if not self.thresholds:
            raise ModelLoadError(f"{source}: no thresholds")
        for i, t in enumerate(self.thresholds):
            if not isinstance(t, (int, float)) or isinstance(t, bool) or not math.isfinite(t) or t < 0:
                raise ModelLoadError(f"{source}: threshold of layer {i} must be a finite number "
                                     f">= 0, got {t!r}")
        if self.num_layers is not None and self.num_layers != len(self.thresholds):
            raise ModelLoadError(f"{source}: num_layers is {self.num_layers} but "
                                 f"{len(self.thresholds)} thresholds are given")
        if self.layer_sparsity and len(self.layer_sparsity) != len(self.thresholds):
            raise ModelLoadError(f"{source}: {len(self.layer_sparsity)} layer_sparsity values for "
                                 f"{len(self.thresholds)} thresholds")

    @property
    def mean_layer_sparsity(self) -> float:
        return sum(self.layer_sparsity) / len(self.layer_sparsity) if self.layer_sparsity else 0.0


def write_sparsity_file(path: str | Path, sparsity: SparsityFile) -> None:
    """Validate and write atomically (a reader never sees half a file)."""
    sparsity.validate(str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)   # NOTE: mkstemp creates 0600; a sidecar is an ordinary shared file
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(sparsity), f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def resolve_path(path: str | Path) -> Path:
    """A relative path that does not exist from the working directory is looked up under
    configs/, so a YAML in configs/ can name its sidecar by file name alone.

    NOTE: `make serve` and tests run from different directories; the shipped sidecar must be
    found from both.
    """
    from sparse_serve.engine.core.config import CONFIG_DIR

    path = Path(path).expanduser()
    if not path.is_absolute() and not path.exists() and (CONFIG_DIR / path).exists():
        return CONFIG_DIR / path
    return path


def read_sparsity_file(path: str | Path) -> SparsityFile:
    path = resolve_path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelLoadError(f"{path}: sparsity file not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"{path}: not a readable JSON sparsity file ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: top level must be a JSON object")
    known = set(SparsityFile.__dataclass_fields__)
    required = {"format", "model", "act", "target_sparsity", "method", "thresholds"}
    missing = sorted(required - raw.keys())
    if missing:
        raise ModelLoadError(f"{path}: missing key(s) {', '.join(missing)}")
    unknown = sorted(raw.keys() - known)
    if unknown:
        raise ModelLoadError(f"{path}: unknown key(s) {', '.join(unknown)}")
    if not isinstance(raw["thresholds"], list):
        raise ModelLoadError(f"{path}: thresholds must be a list")
    sparsity = SparsityFile(**{"layer_sparsity": [], **raw})
    sparsity.validate(str(path))
    return sparsity


def set_thresholds(model, thresholds: list[float]) -> None:
    """Per-layer CATS thresholds onto a loaded CausalLM (0 = dense SwiGLU)."""
    mlps = model.mlps
    if len(thresholds) != len(mlps):
        raise ModelLoadError(f"{len(thresholds)} thresholds for a model with {len(mlps)} layers")
    for mlp, threshold in zip(mlps, thresholds):
        mlp.act_threshold = float(threshold)


def apply_sparsity_file(model, sparsity: str | Path | SparsityFile) -> SparsityFile:
    """Check that the sidecar fits the model (layer count, width, activation) and set its
    thresholds. Raises ModelLoadError naming the file and the mismatch."""
    source = "sparsity file"
    if not isinstance(sparsity, SparsityFile):
        source = str(sparsity)
        sparsity = read_sparsity_file(sparsity)
    mlps = model.mlps
    if len(sparsity.thresholds) != len(mlps):
        raise ModelLoadError(f"{source}: calibrated for {len(sparsity.thresholds)} layers "
                             f"({sparsity.model}), the model has {len(mlps)}")
    acts = {mlp.act for mlp in mlps}
    if acts != {sparsity.act}:
        raise ModelLoadError(f"{source}: thresholds are for act={sparsity.act!r}, the model's FFN "
                             f"uses {', '.join(sorted(acts))}")
    inter = model.config.intermediate_size
    if sparsity.intermediate_size is not None and sparsity.intermediate_size != inter:
        raise ModelLoadError(f"{source}: calibrated for intermediate_size "
                             f"{sparsity.intermediate_size}, the model has {inter}")
    set_thresholds(model, sparsity.thresholds)
    return sparsity
