"""The published layout of each sparse checkpoint family, and the check that a folder matches it.

A YAML in configs/ names its family (`model.checkpoint_family`); the loader then refuses a
folder whose config.json or tensors differ from what that family publishes, with an error that
names the file, the field or tensor, and what was expected. The layouts below are the public
Hugging Face releases (config.json fields, tensor names and dtypes; docs/CHECKPOINTS.md has the
sources). Custom modeling files that ship with them (modeling_bamboo.py, modeling_sparsellama.py)
are never imported: the architecture is implemented natively.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparse_serve.engine.checkpoints.safetensors_io import TensorEntry
from sparse_serve.engine.core.errors import ModelLoadError

# config.json fields every family's loader reads (the published files all carry them).
GEOMETRY_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "vocab_size", "rms_norm_eps", "max_position_embeddings")
TORCH_DTYPE_NAMES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True)
class CheckpointFamily:
    name: str
    release: str                               # the public checkpoint this layout is taken from
    architectures: tuple[str, ...]             # config.json architectures[0] must be one of these
    model_type: str
    fields: tuple[str, ...]                    # config.json keys that must be present
    values: Mapping[str, Any]                  # config.json keys with a fixed published value
    torch_dtype: str                           # the published weights' dtype
    predictors: bool                           # every layer ships mlp.predictor.fc1/fc2
    rules: tuple[tuple[str, Callable[[dict], bool]], ...] = field(default=())   # (expectation, check)


FAMILIES: dict[str, CheckpointFamily] = {f.name: f for f in (
    CheckpointFamily(
        name="turbosparse-mistral", release="PowerInfer/TurboSparse-Mistral-Instruct",
        architectures=("BambooForCausalLM",), model_type="bamboo",
        fields=GEOMETRY_FIELDS + ("num_key_value_heads", "rope_theta", "sliding_window",
                                  "tie_word_embeddings", "torch_dtype"),
        values={"hidden_act": "relu", "tie_word_embeddings": False},
        torch_dtype="bfloat16", predictors=True,
        rules=(("num_key_value_heads < num_attention_heads (grouped-query attention)",
                lambda c: c["num_key_value_heads"] < c["num_attention_heads"]),)),
    CheckpointFamily(
        name="prosparse-llama2", release="SparseLLM/prosparse-llama-2-7b",
        architectures=("SparseLlamaForCausalLM",), model_type="sparsellama",
        fields=GEOMETRY_FIELDS + ("num_key_value_heads", "hidden_act_param", "torch_dtype"),
        values={"hidden_act": "fatrelu", "tie_word_embeddings": False},
        torch_dtype="bfloat16", predictors=False,
        rules=(("hidden_act_param a number >= 0 (the FATReLU threshold)",
                lambda c: isinstance(c["hidden_act_param"], (int, float))
                and not isinstance(c["hidden_act_param"], bool) and c["hidden_act_param"] >= 0),)),
    CheckpointFamily(
        name="relullama", release="SparseLLM/ReluLLaMA-7B",
        architectures=("LlamaForCausalLM",), model_type="llama",
        fields=GEOMETRY_FIELDS + ("torch_dtype",),
        values={"hidden_act": "relu", "tie_word_embeddings": False},
        torch_dtype="float32", predictors=False,
        rules=(("no grouped-query attention (num_key_value_heads absent or == num_attention_heads)",
                lambda c: c.get("num_key_value_heads") in (None, c["num_attention_heads"])),)),
)}


def get_family(name: str) -> CheckpointFamily:
    if name not in FAMILIES:
        raise ModelLoadError(f"unknown checkpoint family {name!r}; known: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[name]


def check_config(family: CheckpointFamily, raw: dict[str, Any], source: Path) -> None:
    """config.json against the family: architecture, model_type, fields, fixed values, rules."""
    where = f"{source}: {family.name} ({family.release})"
    architectures = raw.get("architectures") or []
    if not architectures or architectures[0] not in family.architectures:
        raise ModelLoadError(f"{where}: field 'architectures' is {architectures!r}, expected "
                             f"[{', '.join(repr(a) for a in family.architectures)}]")
    if raw.get("model_type") != family.model_type:
        raise ModelLoadError(f"{where}: field 'model_type' is {raw.get('model_type')!r}, "
                             f"expected {family.model_type!r}")
    for key in family.fields:
        if key not in raw:
            raise ModelLoadError(f"{where}: required field {key!r} is missing")
    for key, value in family.values.items():
        if raw.get(key) != value:
            raise ModelLoadError(f"{where}: field {key!r} is {raw.get(key)!r}, expected {value!r}")
    if raw["torch_dtype"] != family.torch_dtype:
        raise ModelLoadError(f"{where}: field 'torch_dtype' is {raw['torch_dtype']!r}, the family "
                             f"publishes {family.torch_dtype!r}")
    for expectation, check in family.rules:
        if not check(raw):
            raise ModelLoadError(f"{where}: expected {expectation}")


def expected_shapes(raw: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every non-predictor tensor a Llama-layout checkpoint with this config.json holds."""
    hidden, inter = raw["hidden_size"], raw["intermediate_size"]
    heads = raw["num_attention_heads"]
    kv_heads = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim") or hidden // heads
    shapes = {"model.embed_tokens.weight": (raw["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    if not raw.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (raw["vocab_size"], hidden)
    for i in range(raw["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes.update({
            f"{p}.input_layernorm.weight": (hidden,), f"{p}.post_attention_layernorm.weight": (hidden,),
            f"{p}.self_attn.q_proj.weight": (heads * head_dim, hidden),
            f"{p}.self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
            f"{p}.self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
            f"{p}.self_attn.o_proj.weight": (hidden, heads * head_dim),
            f"{p}.mlp.gate_proj.weight": (inter, hidden), f"{p}.mlp.up_proj.weight": (inter, hidden),
            f"{p}.mlp.down_proj.weight": (hidden, inter)})
    return shapes


def predictor_names(layer: int) -> tuple[str, str]:
    prefix = f"model.layers.{layer}.mlp.predictor"
    return f"{prefix}.fc1.weight", f"{prefix}.fc2.weight"


def check_tensors(family: CheckpointFamily, raw: dict[str, Any], entries: dict[str, TensorEntry],
                  index_path: Path) -> None:
    """Every published tensor present with its published shape and dtype; predictors (where the
    family ships them) on every layer, fc1 [r_l, hidden] and fc2 [intermediate, r_l] with the
    same r_l per layer (r_l may differ between layers), and no bias."""
    where = f"{family.name} ({family.release})"
    want_dtype = TORCH_DTYPE_NAMES[family.torch_dtype]
    shapes = expected_shapes(raw)
    for name, shape in shapes.items():
        entry = entries.get(name)
        if entry is None:
            raise ModelLoadError(f"{index_path}: tensor {name!r} is missing; {where} publishes it "
                                 f"with shape {shape}")
        if entry.shape != shape:
            raise ModelLoadError(f"{entry.path}: tensor {name!r} has shape {entry.shape}, expected "
                                 f"{shape} ({where}, from config.json)")
        if entry.dtype != want_dtype:
            raise ModelLoadError(f"{entry.path}: tensor {name!r} is {entry.dtype}, expected "
                                 f"{want_dtype} ({where} publishes {family.torch_dtype})")
    hidden, inter = raw["hidden_size"], raw["intermediate_size"]
    for i in range(raw["num_hidden_layers"]):
        fc1_name, fc2_name = predictor_names(i)
        fc1, fc2 = entries.get(fc1_name), entries.get(fc2_name)
        if not family.predictors:
            continue
        for name, entry in ((fc1_name, fc1), (fc2_name, fc2)):
            if entry is None:
                raise ModelLoadError(f"{index_path}: tensor {name!r} is missing; {where} ships a "
                                     f"predictor (fc1 [rank, {hidden}], fc2 [{inter}, rank]) on every layer")
            if entry.dtype != want_dtype:
                raise ModelLoadError(f"{entry.path}: tensor {name!r} is {entry.dtype}, expected {want_dtype}")
        if len(fc1.shape) != 2 or fc1.shape[1] != hidden:
            raise ModelLoadError(f"{fc1.path}: tensor {fc1_name!r} has shape {fc1.shape}, expected "
                                 f"(rank, {hidden})")
        if fc2.shape != (inter, fc1.shape[0]):
            raise ModelLoadError(f"{fc2.path}: tensor {fc2_name!r} has shape {fc2.shape}, expected "
                                 f"({inter}, {fc1.shape[0]}) to match fc1's rank {fc1.shape[0]}")
    biases = sorted(n for n in entries if n.endswith(".bias"))
    if biases:
        raise ModelLoadError(f"{entries[biases[0]].path}: tensor {biases[0]!r} is not part of {where}, "
                             "which has no biases")
