"""Load a local HF-style checkpoint folder into the native model. No network, ever.

Accepts one `model.safetensors` or a sharded `model.safetensors.index.json`; every error names
the file (and tensor) at fault. With `model.checkpoint_family` set, the folder must also match
that family's published layout (engine/checkpoints/families.py). Tensors are read straight into
the parameters that hold them (engine/checkpoints/safetensors_io.py), so the peak memory of a
load is about the model's own size.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from sparse_serve.engine.checkpoints.families import check_config, check_tensors, get_family, predictor_names
from sparse_serve.engine.checkpoints.safetensors_io import TensorEntry, read_header, read_into
from sparse_serve.engine.core.config import DTYPE_NAMES, ModelConfig
from sparse_serve.engine.core.errors import ModelLoadError
from sparse_serve.engine.models.arch_config import ModelArchConfig, read_config_json
from sparse_serve.engine.models.llama import CausalLM

logger = logging.getLogger(__name__)

TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
# Tensors older checkpoints carry that the native model recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        # NOTE: CPU matmuls in bf16 are slower than fp32 on most x86 hosts; GPUs want bf16.
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return TORCH_DTYPES[name]


def checkpoint_files(folder: Path) -> dict[str, Path]:
    """Map every tensor name to the safetensors file holding it."""
    return {name: entry.path for name, entry in checkpoint_entries(folder).items()}


def index_path(folder: Path) -> Path:
    """The file that lists the folder's tensors (the index, or the single model.safetensors)."""
    index = folder / "model.safetensors.index.json"
    return index if index.is_file() else folder / "model.safetensors"


def checkpoint_entries(folder: Path) -> dict[str, TensorEntry]:
    """Every tensor of the checkpoint (file, dtype, shape, byte range), from the shards' headers.
    A sharded index must agree with its shards: every listed tensor in the shard it names."""
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from exc
        headers = {shard: read_header(folder / shard) for shard in sorted(set(weight_map.values()))}
        entries = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise ModelLoadError(f"{folder / shard}: tensor {name!r} is listed in the index but "
                                     "not in this file")
            entries[name] = headers[shard][name]
        return entries
    if single.is_file():
        return read_header(single)
    raise ModelLoadError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


def load_arch_config(cfg: ModelConfig, folder: Path, entries: dict[str, TensorEntry]) -> ModelArchConfig:
    """config.json (checked against cfg.checkpoint_family when set) plus each layer's predictor
    width, read from its fc1 tensor (published predictors may differ in width per layer)."""
    raw = read_config_json(folder)
    if cfg.checkpoint_family:
        family = get_family(cfg.checkpoint_family)
        check_config(family, raw, folder / "config.json")
        check_tensors(family, raw, entries, index_path(folder))
    arch = ModelArchConfig.from_dict(raw, source=str(folder / "config.json"),
                                     ffn_act_override=cfg.ffn_act,
                                     act_threshold_override=cfg.act_threshold)
    ranks = []
    for i in range(arch.num_layers):
        fc1, fc2 = (entries.get(n) for n in predictor_names(i))
        if (fc1 is None) != (fc2 is None):
            present, absent = (fc1, predictor_names(i)[1]) if fc1 else (fc2, predictor_names(i)[0])
            raise ModelLoadError(f"{present.path}: layer {i} has one predictor tensor without the "
                                 f"other ({absent!r} is missing)")
        if fc1 is not None and len(fc1.shape) != 2:
            raise ModelLoadError(f"{fc1.path}: tensor {predictor_names(i)[0]!r} has shape {fc1.shape}, "
                                 f"expected (rank, {arch.hidden_size})")
        ranks.append(fc1.shape[0] if fc1 is not None else None)
    if any(r is not None for r in ranks):
        arch.predictor_ranks = ranks
        arch.predictor_rank = max(r for r in ranks if r is not None)
    return arch


def load_model(cfg: ModelConfig, folder: str | Path) -> tuple[CausalLM, ModelArchConfig]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model folder does not exist")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    entries = checkpoint_entries(folder)
    arch = load_arch_config(cfg, folder, entries)
    with torch.device("meta"):
        # NOTE: cast while on meta, so to_empty allocates each weight once, in its final dtype
        model = CausalLM(arch).to(dtype)
    model.to_empty(device=device)
    if arch.tie_word_embeddings:   # to_empty() gives each module its own storage: re-tie
        model.lm_head.weight = model.model.embed_tokens.weight
    _copy_weights(model, entries, index_path(folder))
    for mlp in model.mlps:
        mlp.use_predictor = cfg.use_predictor and mlp.predictor is not None
        mlp.predictor_threshold = cfg.predictor_threshold
        mlp.use_sparse_kernels = cfg.sparse_kernels
        mlp.dense_fallback_fraction = cfg.dense_fallback_fraction
        mlp.prepare_for_inference()
    model.eval().requires_grad_(False)
    if cfg.quantization:
        from sparse_serve.engine.models.quantized import quantize_model

        try:
            quantize_model(model, cfg.quantization)
        except ValueError as exc:
            raise ModelLoadError(str(exc)) from exc
    if cfg.sparsity_file:
        from sparse_serve.engine.checkpoints.sparsity_file import apply_sparsity_file

        sidecar = apply_sparsity_file(model, cfg.sparsity_file)   # ModelLoadError on a mismatch
        logger.info("sparsity: %s thresholds from %s (target %.2f, calibrated %.3f)",
                    sidecar.method, cfg.sparsity_file, sidecar.target_sparsity,
                    sidecar.mean_layer_sparsity)
    logger.info("loaded %s (%s, ffn=%s, predictor ranks=%s) from %s: %.1fM params, %s on %s%s",
                arch.architecture, arch.model_type, arch.ffn_act, _ranks_text(arch.predictor_ranks), folder,
                model.num_params() / 1e6, dtype, device,
                f", {cfg.quantization} weights" if cfg.quantization else "")
    return model, arch


def _ranks_text(ranks: list[int | None] | None) -> str:
    if not ranks:
        return "none"
    distinct = sorted({r for r in ranks if r is not None})
    return str(distinct[0]) if len(distinct) == 1 and None not in ranks else str(ranks)


def _copy_weights(model: CausalLM, entries: dict[str, TensorEntry], listing: Path) -> None:
    """Each parameter read from its file (one tensor at a time, see safetensors_io.py)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    expected = {n for n in params if not (tied and n == "lm_head.weight")}
    missing = sorted(expected - entries.keys())
    if missing:
        raise ModelLoadError(f"{listing}: checkpoint is missing tensor {missing[0]!r}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, entry in entries.items():
        ignorable = name.endswith(_IGNORED_SUFFIXES) or (tied and name == "lm_head.weight")
        if name not in expected and not ignorable:
            logger.warning("ignoring unexpected tensor %s in %s", name, entry.path.name)
    # NOTE: file order, then offset order: each shard is read front to back once.
    for name in sorted(expected, key=lambda n: (str(entries[n].path), entries[n].start)):
        with torch.no_grad():
            read_into(entries[name], params[name].data, name)
