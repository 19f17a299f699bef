"""Every loader failure names the file (and tensor) at fault."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparse_serve.engine.checkpoints.loader import load_model
from sparse_serve.engine.core.config import EngineConfig, ModelConfig
from sparse_serve.engine.core.errors import ModelLoadError
from sparse_serve.engine.models.arch_config import ModelArchConfig
from tests.tiny_checkpoint import make_tiny_checkpoint

CPU = ModelConfig(dtype="float32", device="cpu", sparse_kernels=False)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "m", "relu")


def copy_of(checkpoint, tmp_path):
    return shutil.copytree(checkpoint, tmp_path / "copy")


def test_missing_folder(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(CPU, tmp_path / "nope")


def test_missing_config(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    (folder / "config.json").unlink()
    with pytest.raises(ModelLoadError, match="config.json not found"):
        load_model(CPU, folder)


def test_missing_safetensors(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="no model.safetensors"):
        load_model(CPU, folder)


def test_corrupt_safetensors(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: corrupt"):
        load_model(CPU, folder)


def test_missing_tensor(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_model(CPU, folder)


def test_shape_mismatch(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=r"q_proj\.weight' has shape \(3, 3\)"):
        load_model(CPU, folder)


def test_unknown_architecture(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelLoadError, match="unsupported architecture.*LlamaForCausalLM.*BambooForCausalLM"):
        load_model(CPU, folder)


def test_sharded_checkpoint_and_missing_shard(checkpoint, tmp_path):
    folder = copy_of(checkpoint, tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({n: tensors[n] for n in shard_names}, str(folder / shard))
        weight_map.update({n: shard for n in shard_names})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load_model(CPU, folder)
    assert torch.equal(model.model.layers[0].mlp.gate_proj.weight, tensors["model.layers.0.mlp.gate_proj.weight"])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="model-00002-of-00002.safetensors: safetensors shard .* missing"):
        load_model(CPU, folder)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_load(checkpoint, dtype):
    name = str(dtype).removeprefix("torch.")
    model, _ = load_model(ModelConfig(dtype=name, device="cpu", sparse_kernels=False), checkpoint)
    assert model.model.embed_tokens.weight.dtype == dtype
    assert model.mlps[0].w_down_t.dtype == dtype


def test_rope_theta_both_layouts():
    base = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=10, hidden_size=8,
                intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    old = ModelArchConfig.from_dict({**base, "rope_theta": 500000.0})
    new = ModelArchConfig.from_dict({**base, "rope_parameters": {"rope_theta": 250000.0, "rope_type": "default"}})
    assert (old.rope_theta, new.rope_theta) == (500000.0, 250000.0)
    with pytest.raises(ModelLoadError, match="rope type 'yarn'"):
        ModelArchConfig.from_dict({**base, "rope_parameters": {"rope_theta": 1.0, "rope_type": "yarn"}})


def test_ffn_act_from_config_and_override():
    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2)
    assert ModelArchConfig.from_dict({**base, "model_type": "bamboo", "hidden_act": "relu"}).ffn_act == "drelu"
    fat = ModelArchConfig.from_dict({**base, "model_type": "llama", "hidden_act": "fatrelu", "hidden_act_param": 0.01})
    assert (fat.ffn_act, fat.act_threshold) == ("fatrelu", 0.01)
    assert ModelArchConfig.from_dict({**base, "model_type": "llama"}, ffn_act_override="relu").ffn_act == "relu"


def test_engine_config_yaml_and_overrides(tmp_path):
    extra = tmp_path / "x.yaml"
    extra.write_text("model:\n  ffn_act: relu\ncache:\n  block_size: 32\n")
    cfg = EngineConfig.load(extra, overrides={"scheduler.max_num_seqs": 3, "model.path": None})
    assert (cfg.model.ffn_act, cfg.cache.block_size, cfg.scheduler.max_num_seqs) == ("relu", 32, 3)
    extra.write_text("cache:\n  blok_size: 32\n")
    with pytest.raises(ValueError, match="unknown config key 'cache.blok_size'"):
        EngineConfig.load(extra)
