"""Load a local HF-style checkpoint folder into the native model. No network, ever.

Accepts one `model.safetensors` or a sharded `model.safetensors.index.json`; every error names
the file (and tensor) at fault.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from sparse_serve.engine.core.config import DTYPE_NAMES, ModelConfig
from sparse_serve.engine.core.errors import ModelLoadError
from sparse_serve.engine.models.arch_config import ModelArchConfig
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
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as exc:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({exc})") from exc
        return {name: folder / shard for name, shard in weight_map.items()}
    if single.is_file():
        return {name: single for name in _tensor_names(single)}
    raise ModelLoadError(f"{folder}: no model.safetensors or model.safetensors.index.json found")


def _tensor_names(path: Path) -> list[str]:
    if not path.is_file():
        raise ModelLoadError(f"{path}: safetensors shard listed in the index is missing")
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    except (SafetensorError, OSError, ValueError) as exc:
        raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file ({exc})") from exc


def load_arch_config(cfg: ModelConfig, folder: Path, tensor_names) -> ModelArchConfig:
    arch = ModelArchConfig.from_folder(folder, ffn_act_override=cfg.ffn_act,
                                       act_threshold_override=cfg.act_threshold)
    fc1 = "model.layers.0.mlp.predictor.fc1.weight"
    if fc1 in tensor_names:
        with safe_open(str(tensor_names[fc1]), framework="pt") as f:
            arch.predictor_rank = f.get_slice(fc1).get_shape()[0]
    return arch


def load_model(cfg: ModelConfig, folder: str | Path) -> tuple[CausalLM, ModelArchConfig]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: model folder does not exist")
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    files = checkpoint_files(folder)
    arch = load_arch_config(cfg, folder, files)
    with torch.device("meta"):
        model = CausalLM(arch)
    model.to_empty(device=device)
    model = model.to(dtype)
    if arch.tie_word_embeddings:   # to_empty() gives each module its own storage: re-tie
        model.lm_head.weight = model.model.embed_tokens.weight
    _copy_weights(model, files, device, dtype)
    for mlp in model.mlps:
        mlp.use_predictor = cfg.use_predictor and mlp.predictor is not None
        mlp.predictor_threshold = cfg.predictor_threshold
        mlp.use_sparse_kernels = cfg.sparse_kernels
        mlp.dense_fallback_fraction = cfg.dense_fallback_fraction
        mlp.prepare_for_inference()
    model.eval().requires_grad_(False)
    if cfg.sparsity_file:
        from sparse_serve.engine.checkpoints.sparsity_file import apply_sparsity_file

        sidecar = apply_sparsity_file(model, cfg.sparsity_file)   # ModelLoadError on a mismatch
        logger.info("sparsity: %s thresholds from %s (target %.2f, calibrated %.3f)",
                    sidecar.method, cfg.sparsity_file, sidecar.target_sparsity,
                    sidecar.mean_layer_sparsity)
    logger.info("loaded %s (%s, ffn=%s, predictor rank=%s) from %s: %.1fM params, %s on %s",
                arch.architecture, arch.model_type, arch.ffn_act, arch.predictor_rank, folder,
                model.num_params() / 1e6, dtype, device)
    return model, arch


def _copy_weights(model: CausalLM, files: dict[str, Path], device, dtype) -> None:
    params = dict(model.named_parameters(remove_duplicate=False))
    tied = model.config.tie_word_embeddings
    expected = {n for n in params if not (tied and n == "lm_head.weight")}
    missing = sorted(expected - files.keys())
    if missing:
        raise ModelLoadError(f"checkpoint is missing tensor {missing[0]!r}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    by_file: dict[Path, list[str]] = {}
    for name, path in files.items():
        if name in expected:
            by_file.setdefault(path, []).append(name)
        elif not name.endswith(_IGNORED_SUFFIXES) and not (tied and name == "lm_head.weight"):
            logger.warning("ignoring unexpected tensor %s in %s", name, path.name)
    for path, names in by_file.items():
        if not path.is_file():
            raise ModelLoadError(f"{path}: safetensors shard listed in the index is missing")
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                available = set(f.keys())
                for name in names:
                    if name not in available:
                        raise ModelLoadError(f"{path}: tensor {name!r} is listed in the index but not in this file")
                    tensor = f.get_tensor(name)
                    target = params[name]
                    if tuple(tensor.shape) != tuple(target.shape):
                        raise ModelLoadError(f"{path}: tensor {name!r} has shape {tuple(tensor.shape)}, "
                                             f"config.json implies {tuple(target.shape)}")
                    target.data.copy_(tensor.to(device=device, dtype=dtype))
        except (SafetensorError, OSError) as exc:
            raise ModelLoadError(f"{path}: corrupt or unreadable safetensors file ({exc})") from exc
