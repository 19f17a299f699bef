"""Synthetic checkpoints in exactly the layout each sparse family publishes, at tiny sizes.

config.json carries the published fields and values (geometry shrunk), tensors carry the
published names and dtypes, split over the published number of shards with an HF-style
model.safetensors.index.json, next to the custom modeling files the release ships. Those files
raise if anything imports them: sparse-serve must never execute checkpoint code.

The published layouts written here are this file's own statement of the releases (read from
their Hugging Face repos; docs/CHECKPOINTS.md), independent of engine/checkpoints/families.py,
which the tests check against them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.checkpoints.llama_tokenizer import write_llama_tokenizer

# TurboSparse-Mistral-Instruct's own tokenizer_config.json template (ChatML).
CHATML_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}{% endif %}"
    "{% if system_message is defined %}{{ '<|im_start|>system\\n' + system_message + '<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% set content = message['content'] %}{% if message['role'] == 'user' %}"
    "{{ '<|im_start|>user\\n' + content + '<|im_end|>\\n<|im_start|>assistant\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ content + '<|im_end|>' + '\\n' }}{% endif %}{% endfor %}")
REMOTE_CODE = ('raise RuntimeError("checkpoint code was executed: sparse-serve must never import '
               'the custom modeling files a checkpoint ships")\n')


@dataclass(frozen=True)
class Geometry:
    hidden_size: int = 64
    intermediate_size: int = 160
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    # one width per layer: published predictors need not share a width
    predictor_ranks: tuple[int, ...] = (24, 16, 32, 20)


def turbosparse_config(g: Geometry, vocab_size: int) -> dict:
    """PowerInfer/TurboSparse-Mistral-Instruct config.json (Bamboo), geometry shrunk."""
    return {
        "_name_or_path": "/mnt/scratch/checkpoint", "architectures": ["BambooForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_bamboo.BambooConfig",
                     "AutoModel": "modeling_bamboo.BambooForCausalLM",
                     "AutoModelForCausalLM": "modeling_bamboo.BambooForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "relu", "hidden_size": g.hidden_size,
        "initializer_range": 0.02, "intermediate_size": g.intermediate_size,
        "max_position_embeddings": 32768, "model_type": "bamboo", "num_attention_heads": g.num_heads,
        "num_hidden_layers": g.num_layers, "num_key_value_heads": g.num_kv_heads, "rms_norm_eps": 1e-05,
        "rope_theta": 10000.0, "sliding_window": 4096, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.41.0", "use_cache": False,
        "vocab_size": vocab_size}


def prosparse_config(g: Geometry, vocab_size: int) -> dict:
    """SparseLLM/prosparse-llama-2-7b config.json, geometry shrunk (Llama-2-7B has no GQA)."""
    return {
        "_name_or_path": "SparseLLM/prosparse-llama-2-7b", "architectures": ["SparseLlamaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_sparsellama.SparseLlamaConfig",
                     "AutoModel": "modeling_sparsellama.SparseLlamaForCausalLM",
                     "AutoModelForCausalLM": "modeling_sparsellama.SparseLlamaForCausalLM"},
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "fatrelu", "hidden_act_param": 0.01,
        "hidden_size": g.hidden_size, "initializer_range": 0.02, "intermediate_size": g.intermediate_size,
        "max_position_embeddings": 4096, "model_type": "sparsellama", "num_attention_heads": g.num_heads,
        "num_hidden_layers": g.num_layers, "num_key_value_heads": g.num_heads, "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "transformers_version": "4.31.0.dev0", "use_cache": True,
        "vocab_size": vocab_size, "max_length": 4096}


def relullama_config(g: Geometry, vocab_size: int) -> dict:
    """SparseLLM/ReluLLaMA-7B config.json (no num_key_value_heads override: MHA), shrunk."""
    return {
        "_name_or_path": "meta-llama/Llama-2-7b-hf", "architectures": ["LlamaForCausalLM"],
        "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "relu", "hidden_size": g.hidden_size,
        "initializer_range": 0.02, "intermediate_size": g.intermediate_size, "max_length": 4096,
        "max_position_embeddings": 2048, "model_type": "llama", "num_attention_heads": g.num_heads,
        "num_hidden_layers": g.num_layers, "num_key_value_heads": g.num_heads, "pad_token_id": 0,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None, "tie_word_embeddings": False,
        "torch_dtype": "float32", "transformers_version": "4.31.0", "use_cache": True,
        "vocab_size": vocab_size}


@dataclass(frozen=True)
class Release:
    config: callable
    dtype: torch.dtype
    num_shards: int
    predictors: bool
    remote_code: tuple[str, ...]
    added_tokens: tuple[str, ...] = ()
    eos_token: str = "</s>"
    chat_template: str | None = None
    vocab_multiple: int = 1          # config vocab_size = tokenizer size rounded up to this
    pickles: bool = False            # the release also ships pytorch_model-*.bin (never read)


RELEASES = {
    "turbosparse-mistral": Release(turbosparse_config, torch.bfloat16, 4, True,
                                   ("configuration_bamboo.py", "modeling_bamboo.py"),
                                   added_tokens=("<|im_end|>", "<|im_start|>"), eos_token="<|im_end|>",
                                   chat_template=CHATML_TEMPLATE, vocab_multiple=64),
    "prosparse-llama2": Release(prosparse_config, torch.bfloat16, 6, False,
                                ("configuration_sparsellama.py", "modeling_sparsellama.py")),
    "relullama": Release(relullama_config, torch.float32, 3, False, (), pickles=True),
}


def layer_tensors(g: Geometry, layer: int, predictors: bool, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One decoder layer in the published names (float32; cast when written)."""
    head_dim = g.hidden_size // g.num_heads
    h, i = g.hidden_size, g.intermediate_size
    p = f"model.layers.{layer}"

    def w(*shape, std=0.08):
        return torch.randn(*shape, generator=gen) * std

    tensors = {f"{p}.input_layernorm.weight": torch.ones(h), f"{p}.post_attention_layernorm.weight": torch.ones(h),
               f"{p}.self_attn.q_proj.weight": w(g.num_heads * head_dim, h),
               f"{p}.self_attn.k_proj.weight": w(g.num_kv_heads * head_dim, h),
               f"{p}.self_attn.v_proj.weight": w(g.num_kv_heads * head_dim, h),
               f"{p}.self_attn.o_proj.weight": w(h, g.num_heads * head_dim),
               f"{p}.mlp.gate_proj.weight": w(i, h), f"{p}.mlp.up_proj.weight": w(i, h),
               f"{p}.mlp.down_proj.weight": w(h, i)}
    if predictors:
        r = g.predictor_ranks[layer % len(g.predictor_ranks)]
        tensors[f"{p}.mlp.predictor.fc1.weight"] = w(r, h, std=h ** -0.5)
        tensors[f"{p}.mlp.predictor.fc2.weight"] = w(i, r, std=r ** -0.5)
    return tensors


def write_release(folder: str | Path, family: str, geometry: Geometry = Geometry(), seed: int = 0) -> Path:
    """Write a synthetic checkpoint of `family` into folder and return it."""
    release = RELEASES[family]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    num_tokens = write_llama_tokenizer(folder, eos_token=release.eos_token, added=release.added_tokens,
                                       chat_template=release.chat_template)
    vocab_size = -(-num_tokens // release.vocab_multiple) * release.vocab_multiple
    g = geometry if family == "turbosparse-mistral" else Geometry(
        geometry.hidden_size, geometry.intermediate_size, geometry.num_layers, geometry.num_heads,
        geometry.num_heads, geometry.predictor_ranks)
    config = release.config(g, vocab_size)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "transformers_version": config["transformers_version"]}))
    for name in release.remote_code:
        (folder / name).write_text(REMOTE_CODE)
    gen = torch.Generator().manual_seed(seed)
    groups = [{"model.embed_tokens.weight": torch.randn(vocab_size, g.hidden_size, generator=gen) * 0.15}]
    groups += [layer_tensors(g, i, release.predictors, gen) for i in range(g.num_layers)]
    groups.append({"model.norm.weight": torch.ones(g.hidden_size),
                   "lm_head.weight": torch.randn(vocab_size, g.hidden_size, generator=gen) * 0.15})
    write_shards(folder, groups, release.num_shards, release.dtype)
    if release.pickles:
        # NOTE: the real repo also has the same weights as pickles; a loader that unpickled
        # them would fail on these bytes.
        for k in range(1, release.num_shards + 1):
            (folder / f"pytorch_model-{k:05d}-of-{release.num_shards:05d}.bin").write_bytes(b"not a pickle")
    return folder


def write_shards(folder: Path, groups: list[dict[str, torch.Tensor]], num_shards: int,
                 dtype: torch.dtype) -> None:
    """Consecutive groups (embeddings, layers, head) into num_shards files + the HF index."""
    assert num_shards <= len(groups), "more shards than groups would leave a shard empty"
    bounds = [round(k * len(groups) / num_shards) for k in range(num_shards + 1)]
    weight_map, total = {}, 0
    for k in range(num_shards):
        name = f"model-{k + 1:05d}-of-{num_shards:05d}.safetensors"
        tensors = {n: t.to(dtype).contiguous() for group in groups[bounds[k]:bounds[k + 1]]
                   for n, t in group.items()}
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({n: name for n in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
