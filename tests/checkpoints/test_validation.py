"""A folder that differs from its family's published layout is refused with an error naming the
file, the tensor or field, and what was expected."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from sparse_serve.engine.checkpoints.loader import load_model
from sparse_serve.engine.core.errors import ModelLoadError
from tests.checkpoints.synthetic import write_release
from tests.checkpoints.test_families import family_config


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return {f: write_release(root / f, f) for f in ("turbosparse-mistral", "prosparse-llama2", "relullama")}


def copy_release(pristine, family, tmp_path):
    return shutil.copytree(pristine[family], tmp_path / family)


def load(family, folder):
    return load_model(family_config(family, folder).model, folder)


def edit_config(folder, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def edit_tensor(folder, name, new=None):
    """Replace (or, with new=None, delete) one tensor in its shard; the index follows."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = folder / index["weight_map"][name]
    tensors = load_file(str(shard))
    if new is None:
        del tensors[name], index["weight_map"][name]
    else:
        tensors[name] = new
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    return shard


def test_missing_predictor_tensor(pristine, tmp_path):
    folder = copy_release(pristine, "turbosparse-mistral", tmp_path)
    edit_tensor(folder, "model.layers.2.mlp.predictor.fc2.weight")
    with pytest.raises(ModelLoadError) as err:
        load("turbosparse-mistral", folder)
    message = str(err.value)
    assert "model.safetensors.index.json" in message
    assert "'model.layers.2.mlp.predictor.fc2.weight' is missing" in message
    assert "ships a predictor (fc1 [rank, 64], fc2 [160, rank]) on every layer" in message


def test_missing_model_tensor(pristine, tmp_path):
    folder = copy_release(pristine, "relullama", tmp_path)
    edit_tensor(folder, "model.layers.1.self_attn.k_proj.weight")
    with pytest.raises(ModelLoadError, match=r"index\.json: tensor 'model\.layers\.1\.self_attn\.k_proj"
                                             r"\.weight' is missing; relullama .* shape \(64, 64\)"):
        load("relullama", folder)


def test_wrong_shape(pristine, tmp_path):
    folder = copy_release(pristine, "turbosparse-mistral", tmp_path)
    shard = edit_tensor(folder, "model.layers.1.mlp.up_proj.weight", torch.zeros(128, 64, dtype=torch.bfloat16))
    with pytest.raises(ModelLoadError) as err:
        load("turbosparse-mistral", folder)
    assert str(err.value).startswith(f"{shard}: tensor 'model.layers.1.mlp.up_proj.weight' has shape "
                                     "(128, 64), expected (160, 64)")


def test_predictor_ranks_must_agree_within_a_layer(pristine, tmp_path):
    folder = copy_release(pristine, "turbosparse-mistral", tmp_path)
    shard = edit_tensor(folder, "model.layers.3.mlp.predictor.fc2.weight",
                        torch.zeros(160, 21, dtype=torch.bfloat16))
    with pytest.raises(ModelLoadError, match=rf"{shard}: tensor 'model\.layers\.3\.mlp\.predictor\.fc2\.weight' "
                                             r"has shape \(160, 21\), expected \(160, 20\)"):
        load("turbosparse-mistral", folder)


def test_wrong_dtype(pristine, tmp_path):
    folder = copy_release(pristine, "prosparse-llama2", tmp_path)
    shard = edit_tensor(folder, "model.layers.0.mlp.gate_proj.weight", torch.zeros(160, 64, dtype=torch.float16))
    with pytest.raises(ModelLoadError, match=rf"{shard}: tensor 'model\.layers\.0\.mlp\.gate_proj\.weight' "
                                             r"is F16, expected BF16"):
        load("prosparse-llama2", folder)


def test_predictor_bias_is_refused(pristine, tmp_path):
    folder = copy_release(pristine, "turbosparse-mistral", tmp_path)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shard_name = index["weight_map"]["model.layers.0.mlp.predictor.fc1.weight"]
    tensors = load_file(str(folder / shard_name))
    tensors["model.layers.0.mlp.predictor.fc1.bias"] = torch.zeros(24, dtype=torch.bfloat16)
    save_file(tensors, str(folder / shard_name))
    index["weight_map"]["model.layers.0.mlp.predictor.fc1.bias"] = shard_name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"predictor\.fc1\.bias' is not part of turbosparse-mistral .* no biases"):
        load("turbosparse-mistral", folder)


@pytest.mark.parametrize("family, changes, expected", [
    ("turbosparse-mistral", {"hidden_act": "silu"}, r"field 'hidden_act' is 'silu', expected 'relu'"),
    ("turbosparse-mistral", {"sliding_window": None}, r"required field 'sliding_window' is missing"),
    ("turbosparse-mistral", {"model_type": "mistral"}, r"field 'model_type' is 'mistral', expected 'bamboo'"),
    ("turbosparse-mistral", {"architectures": ["MistralForCausalLM"]},
     r"field 'architectures' is \['MistralForCausalLM'\], expected \['BambooForCausalLM'\]"),
    ("turbosparse-mistral", {"torch_dtype": "float16"}, r"field 'torch_dtype' is 'float16', the family publishes 'bfloat16'"),
    ("turbosparse-mistral", {"num_key_value_heads": 4}, r"expected num_key_value_heads < num_attention_heads"),
    ("prosparse-llama2", {"hidden_act_param": None}, r"required field 'hidden_act_param' is missing"),
    ("prosparse-llama2", {"hidden_act_param": -1}, r"expected hidden_act_param a number >= 0"),
    ("prosparse-llama2", {"hidden_act": "relu"}, r"field 'hidden_act' is 'relu', expected 'fatrelu'"),
    ("relullama", {"num_key_value_heads": 2}, r"expected no grouped-query attention"),
    ("relullama", {"hidden_act": "silu"}, r"field 'hidden_act' is 'silu', expected 'relu'"),
])
def test_config_fields(pristine, tmp_path, family, changes, expected):
    folder = copy_release(pristine, family, tmp_path)
    edit_config(folder, **changes)
    with pytest.raises(ModelLoadError, match=rf"{folder / 'config.json'}: {family} \(.*\): {expected}"):
        load(family, folder)


def test_wrong_geometry_in_config_names_the_tensor(pristine, tmp_path):
    """config.json says one width, the tensors another: the first tensor that disagrees is named."""
    folder = copy_release(pristine, "relullama", tmp_path)
    edit_config(folder, intermediate_size=96)
    with pytest.raises(ModelLoadError, match=r"model-00001-of-00003\.safetensors: tensor "
                                             r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape \(160, 64\), "
                                             r"expected \(96, 64\)"):
        load("relullama", folder)


def test_unknown_family(pristine):
    cfg = family_config("relullama", pristine["relullama"]).model
    cfg.checkpoint_family = "llama-9"
    with pytest.raises(ModelLoadError, match="unknown checkpoint family 'llama-9'; known: prosparse-llama2"):
        load_model(cfg, pristine["relullama"])


def test_sparse_llama_name_is_only_prosparse():
    """Several research models call themselves SparseLlamaForCausalLM; only ProSparse's layout
    (model_type sparsellama, FATReLU) is implemented, the others are refused by name."""
    from sparse_serve.engine.models.arch_config import ModelArchConfig

    base = dict(vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, architectures=["SparseLlamaForCausalLM"])
    prosparse = ModelArchConfig.from_dict({**base, "model_type": "sparsellama", "hidden_act": "fatrelu",
                                           "hidden_act_param": 0.01})
    assert (prosparse.architecture, prosparse.ffn_act, prosparse.act_threshold) == \
        ("SparseLlamaForCausalLM", "fatrelu", 0.01)
    with pytest.raises(ModelLoadError, match="unsupported architecture"):
        ModelArchConfig.from_dict({**base, "model_type": "llama_sparse_relu"})
