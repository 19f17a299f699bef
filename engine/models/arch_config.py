"""What a checkpoint's config.json says about the network, normalised into one dataclass.

Reads config.json as older checkpoints write it (top-level `rope_theta`) and as transformers 5
writes it (`rope_parameters`). Architectures are implemented natively (no trust_remote_code);
anything else is refused with a message naming what is supported.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparse_serve.engine.core.errors import ModelLoadError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "BambooForCausalLM",
                           "SparseLlamaForCausalLM")
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "bamboo", "sparsellama")
# NOTE: "SparseLlamaForCausalLM" names several unrelated research models; only ProSparse's
# (model_type "sparsellama": a Llama with FATReLU) is the one implemented here.
_ARCH_MODEL_TYPES = {"SparseLlamaForCausalLM": ("sparsellama",)}
_ARCH_OF_MODEL_TYPE = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                       "bamboo": "BambooForCausalLM", "sparsellama": "SparseLlamaForCausalLM"}


def read_config_json(folder: Path) -> dict[str, Any]:
    """A model folder's config.json as a dict; ModelLoadError naming the file otherwise."""
    path = folder / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{path}: config.json not found in the model folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ModelLoadError(f"{path}: top level must be a JSON object")
    return raw


@dataclass
class ModelArchConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling_factor: float        # linear RoPE scaling (1.0: none)
    max_position_embeddings: int
    sliding_window: int | None
    tie_word_embeddings: bool
    ffn_act: str                      # silu | relu | drelu | fatrelu
    act_threshold: float              # fatrelu threshold (0 for the others)
    torch_dtype: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]
    predictor_rank: int | None = None # set by the loader when the checkpoint has predictors
    # per layer (None: no predictor on that layer); published predictors may differ in width
    predictor_ranks: list[int | None] | None = None

    def predictor_rank_of(self, layer: int) -> int | None:
        if self.predictor_ranks is not None:
            return self.predictor_ranks[layer]
        return self.predictor_rank

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json",
                  ffn_act_override: str | None = None,
                  act_threshold_override: float | None = None) -> "ModelArchConfig":
        architectures = raw.get("architectures") or []
        model_type = raw.get("model_type", "")
        arch = next((a for a in architectures if a in SUPPORTED_ARCHITECTURES
                     and model_type in _ARCH_MODEL_TYPES.get(a, (model_type,))), None)
        if arch is None and model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(
                f"{source}: unsupported architecture {architectures or model_type!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)} "
                f"(model_type {', '.join(SUPPORTED_MODEL_TYPES)})")
        if arch is None:
            arch = _ARCH_OF_MODEL_TYPE[model_type]

        def need(key: str) -> Any:
            if key not in raw:
                raise ModelLoadError(f"{source}: missing required key '{key}'")
            return raw[key]

        hidden = int(need("hidden_size"))
        num_heads = int(need("num_attention_heads"))
        rope_theta, rope_scaling_factor = _rope(raw, source)
        ffn_act, threshold = _ffn_act(raw, arch, model_type, source)
        if ffn_act_override is not None:
            ffn_act = ffn_act_override
        if act_threshold_override is not None:
            threshold = float(act_threshold_override)
        eos = raw.get("eos_token_id")
        eos_ids = [] if eos is None else ([int(e) for e in eos] if isinstance(eos, list) else [int(eos)])
        window = raw.get("sliding_window") if raw.get("use_sliding_window", True) else None
        return cls(
            architecture=arch,
            model_type=model_type or arch.replace("ForCausalLM", "").lower(),
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or num_heads),
            head_dim=int(raw.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling_factor=rope_scaling_factor,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            sliding_window=int(window) if window else None,
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            ffn_act=ffn_act,
            act_threshold=threshold,
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )

    @classmethod
    def from_folder(cls, folder: str | Path, **overrides: Any) -> "ModelArchConfig":
        return cls.from_dict(read_config_json(Path(folder)), source=str(Path(folder) / "config.json"), **overrides)


def _rope(raw: dict[str, Any], source: str) -> tuple[float, float]:
    """(rope_theta, linear scaling factor) from either layout; other RoPE types are refused."""
    params = raw.get("rope_parameters")
    if isinstance(params, dict):  # transformers 5 layout
        theta, scaling = params.get("rope_theta", raw.get("rope_theta", 10000.0)), params
    else:
        theta, scaling = raw.get("rope_theta", 10000.0), raw.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or "default"
    if rope_type == "default":
        return float(theta), 1.0
    if rope_type == "linear":
        factor = scaling.get("factor")
        if not isinstance(factor, (int, float)) or factor <= 0:
            raise ModelLoadError(f"{source}: linear RoPE scaling needs a positive 'factor', got {factor!r}")
        return float(theta), float(factor)
    raise ModelLoadError(f"{source}: rope type {rope_type!r} is not supported (default and linear are)")


def _ffn_act(raw: dict[str, Any], arch: str, model_type: str, source: str) -> tuple[str, float]:
    act = raw.get("hidden_act", "silu")
    # NOTE: Bamboo / TurboSparse configs say hidden_act "relu" but apply it to both gate and up
    # (dReLU); the architecture, not hidden_act, tells the two apart.
    if arch == "BambooForCausalLM" or model_type == "bamboo":
        return "drelu", 0.0
    if act == "fatrelu":
        return "fatrelu", float(raw.get("hidden_act_param", 0.0))
    if act in ("silu", "swish"):
        return "silu", 0.0
    if act == "relu":
        return "relu", 0.0
    raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported; supported: silu, relu, fatrelu, "
                         "and dReLU via model_type bamboo")
