"""The one configuration tree: model / cache / scheduler / server.

Built once from YAML files in configs/ (later files and dotted overrides win) and validated, then
passed down and never mutated except for derived values the engine sets at start-up (KV block
count, EOS ids), which it logs once.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sparse_serve.kernels.activations import ACTIVATIONS

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"
# The weight dtypes a model can be served in, by name (engine/checkpoints/loader.py maps them onto
# torch dtypes); "auto" picks one per device.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
MODEL_DTYPES = ("auto", *DTYPE_NAMES)
# Weight quantizations a model can be served with (None: the weights stay in the model dtype).
# int8: int8 weights, activations on a 14-bit grid; w8a8: int8 weights and 8-bit activations;
# int4 / w4a8: the same with 4-bit rows for the attention projections and the FFN
# (engine/models/quantized.py).
QUANTIZATIONS = (None, "int8", "w8a8", "int4", "w4a8")


@dataclass
class ModelConfig:
    path: str | None = None                 # local HF-style folder; None: the embedded default
    checkpoint_family: str | None = None    # check the folder against a published layout
                                            # (engine/checkpoints/families.py)
    dtype: str = "auto"                     # auto | float32 | bfloat16 | float16
    device: str = "auto"                    # auto | cpu | cuda
    served_model_name: str | None = None    # defaults to the folder name
    max_model_len: int | None = None        # defaults to max_position_embeddings
    ffn_act: str | None = None              # override of what config.json implies
    act_threshold: float | None = None      # fatrelu threshold override
    use_predictor: bool = True              # use the checkpoint's predictors when present
    predictor_threshold: float = 0.0        # active iff predictor logit > this
    sparsity_file: str | None = None        # calibrated thresholds sidecar (JSON)
    sparse_kernels: bool = True             # False: always run the dense FFN
    dense_fallback_fraction: float | None = None  # active fraction above which dense wins
    chat_template: str | None = None        # path to a Jinja file overriding the tokenizer's
    enforce_eager: bool = False             # True: no CUDA graphs for decode steps
    quantization: str | None = None         # None | int8 | w8a8 | int4 | w4a8 (QUANTIZATIONS)
                                            # (CPU; engine/models/quantized.py)
    seed: int = 0


@dataclass
class CacheConfig:
    block_size: int = 16
    kv_cache_bytes: int = 1 << 30           # budget on CPU
    gpu_memory_utilization: float = 0.85    # fraction of free memory on GPU
    enable_prefix_caching: bool = True
    num_blocks: int | None = None           # derived at start-up unless forced


@dataclass
class SchedulerConfig:
    max_num_batched_tokens: int = 2048
    max_num_seqs: int = 64
    max_queued_requests: int = 256


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: list[str] = field(default_factory=list)
    allowed_origins: list[str] = field(default_factory=list)
    max_body_bytes: int = 4 << 20
    shutdown_timeout_s: float = 30.0
    log_level: str = "info"
    predictor_shadow_rate: float = 0.0      # fraction of steps checked against exact activation
    tool_call_parser: str = "hermes"        # tool_choice "auto": hermes | mistral | llama3_json


@dataclass
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)

    @classmethod
    def load(cls, *yaml_paths: str | Path, overrides: dict[str, Any] | None = None) -> "EngineConfig":
        """configs/default.yaml, then each given file, then dotted overrides
        (`{"model.path": "...", "cache.block_size": 32}`); None override values are skipped."""
        cfg = cls()
        # NOTE: configs/default.yaml mirrors the dataclass defaults; a wheel install without
        # the repository's configs/ folder still gets the same values from the dataclasses.
        defaults = CONFIG_DIR / "default.yaml"
        for path in ((defaults,) if defaults.is_file() else ()) + tuple(yaml_paths):
            cfg.apply(_read_yaml(Path(path)), source=str(path))
        for key, value in (overrides or {}).items():
            if value is not None:
                cfg.set(key, value)
        cfg.validate()
        return cfg

    def apply(self, tree: dict[str, Any], source: str = "<dict>") -> None:
        for section, values in tree.items():
            if not isinstance(values, dict):
                raise ValueError(f"{source}: section '{section}' must be a mapping")
            for key, value in values.items():
                self.set(f"{section}.{key}", value, source)

    def set(self, dotted: str, value: Any, source: str = "override") -> None:
        section, _, key = dotted.partition(".")
        sub = getattr(self, section, None)
        if sub is None or not dataclasses.is_dataclass(sub):
            raise ValueError(f"{source}: unknown config section '{section}'")
        names = {f.name for f in dataclasses.fields(sub)}
        if key not in names:
            raise ValueError(f"{source}: unknown config key '{dotted}' (known: {sorted(names)})")
        setattr(sub, key, value)

    def validate(self) -> None:
        if self.model.ffn_act is not None and self.model.ffn_act not in ACTIVATIONS:
            raise ValueError(f"model.ffn_act must be one of {ACTIVATIONS}, got {self.model.ffn_act!r}")
        if self.model.dtype not in MODEL_DTYPES:
            raise ValueError(f"model.dtype must be one of {MODEL_DTYPES}, got {self.model.dtype!r}")
        if self.model.quantization not in QUANTIZATIONS:
            raise ValueError(f"model.quantization must be one of {QUANTIZATIONS}, got {self.model.quantization!r}")
        if self.model.quantization is not None and self.model.device.startswith("cuda"):
            raise ValueError(f"model.quantization {self.model.quantization!r} (--quantization) runs on the CPU "
                             "only for now; use --device cpu or drop --quantization")
        if self.cache.block_size < 1:
            raise ValueError("cache.block_size must be positive")
        if self.scheduler.max_num_seqs < 1 or self.scheduler.max_num_batched_tokens < 1:
            raise ValueError("scheduler.max_num_seqs and max_num_batched_tokens must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"{path}: top level must be a mapping of sections")
    return tree
