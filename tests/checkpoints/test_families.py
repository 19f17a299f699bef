"""Every family config in configs/ loads a checkpoint laid out exactly as its release publishes
it, and serves it: tokenizer, chat template, padded vocabulary, per-layer predictor widths."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from sparse_serve.engine.checkpoints.families import FAMILIES
from sparse_serve.engine.checkpoints.loader import load_model
from sparse_serve.engine.core.config import CONFIG_DIR, EngineConfig
from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.text.tokenizer import Tokenizer
from tests.checkpoints.synthetic import RELEASES, Geometry, write_release

FAMILY_CONFIGS = {"turbosparse-mistral": "turbosparse-mistral.yaml",
                  "prosparse-llama2": "prosparse-llama2.yaml", "relullama": "relullama.yaml"}
EXPECTED_ACT = {"turbosparse-mistral": ("drelu", 0.0), "prosparse-llama2": ("fatrelu", 0.01),
                "relullama": ("relu", 0.0)}


def family_config(family: str, folder, **overrides) -> EngineConfig:
    return EngineConfig.load(CONFIG_DIR / FAMILY_CONFIGS[family], overrides={
        "model.path": str(folder), "model.device": "cpu", "model.dtype": "float32",
        "cache.kv_cache_bytes": 4 << 20, "cache.block_size": 4, **overrides})


@pytest.fixture(scope="module")
def releases(tmp_path_factory):
    root = tmp_path_factory.mktemp("releases")
    return {family: write_release(root / family, family) for family in RELEASES}


def test_every_family_has_a_config_and_a_synthetic_release():
    assert set(FAMILY_CONFIGS) == set(FAMILIES) == set(RELEASES)
    for family, name in FAMILY_CONFIGS.items():
        assert EngineConfig.load(CONFIG_DIR / name).model.checkpoint_family == family


@pytest.mark.parametrize("family", sorted(RELEASES))
def test_family_config_loads_its_release(family, releases):
    folder = releases[family]
    release = RELEASES[family]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == release.num_shards
    model, arch = load_model(family_config(family, folder).model, folder)
    assert (arch.ffn_act, arch.act_threshold) == EXPECTED_ACT[family]
    assert {m.act for m in model.mlps} == {EXPECTED_ACT[family][0]}
    if release.predictors:   # published widths differ per layer; each layer gets its own
        assert arch.predictor_ranks == list(Geometry().predictor_ranks)
        assert [m.predictor.fc1.weight.shape[0] for m in model.mlps] == list(Geometry().predictor_ranks)
        assert all(m.use_predictor for m in model.mlps)
    else:
        assert arch.predictor_ranks is None and all(m.predictor is None for m in model.mlps)
    # bf16 / fp32 on disk, loaded bit-exactly into float32
    from safetensors import safe_open
    shard = folder / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    with safe_open(str(shard), framework="pt") as f:
        stored = f.get_tensor("model.layers.1.mlp.up_proj.weight")
    assert stored.dtype == release.dtype
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, stored.float())
    assert not any(name.startswith(("modeling_", "configuration_")) for name in sys.modules)


def test_turbosparse_vocabulary_chat_template_and_generation(releases):
    folder = releases["turbosparse-mistral"]
    config = json.loads((folder / "config.json").read_text())
    tokenizer = Tokenizer.from_pretrained(str(folder))
    # as published: embedding rows padded past the tokenizer (32064 rows, 32002 tokens)
    assert config["vocab_size"] % 64 == 0 and tokenizer.vocab_size < config["vocab_size"]
    im_end = tokenizer.hf.convert_tokens_to_ids("<|im_end|>")
    assert im_end == tokenizer.vocab_size - 2 and tokenizer.eos_token_id == im_end
    llm = LLM(str(folder), config=family_config("turbosparse-mistral", folder))
    assert im_end in llm.engine.eos_token_ids and 2 in llm.engine.eos_token_ids
    prompt = llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}])
    assert "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n" in prompt
    [result] = llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    assert len(result.completions[0].token_ids) == 6
    assert result.stats.num_prompt_tokens > 0


@pytest.mark.parametrize("family", ["prosparse-llama2", "relullama"])
def test_families_without_predictors_generate(family, releases):
    folder = releases[family]
    llm = LLM(str(folder), config=family_config(family, folder))
    [result] = llm.generate(["The capital of France is"],
                            SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(result.completions[0].token_ids) == 4


def test_release_loads_without_a_family_check(releases):
    """The family check is an extra: the plain loader reads the same folders."""
    folder = releases["turbosparse-mistral"]
    cfg = EngineConfig.load(overrides={"model.path": str(folder), "model.device": "cpu",
                                       "model.dtype": "bfloat16"}).model
    model, arch = load_model(cfg, folder)
    assert arch.architecture == "BambooForCausalLM" and model.lm_head.weight.dtype == torch.bfloat16


def test_mistral_inst_template_for_turbosparse(releases):
    """The [INST] format for Mistral-Instruct-style checkpoints, through --chat-template."""
    folder = releases["turbosparse-mistral"]
    template = CONFIG_DIR / "chat_templates" / "mistral-inst.jinja"
    tokenizer = Tokenizer.from_pretrained(str(folder), str(template))
    text = tokenizer.apply_chat_template([{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": "Hi"},
                                          {"role": "assistant", "content": "Hello"},
                                          {"role": "user", "content": "Paris?"}])
    assert text == "<s>[INST] Be brief.\n\nHi [/INST]Hello<|im_end|>[INST] Paris? [/INST]"
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == 1 and ids.count(1) == 1    # one BOS, from the template


def test_padded_embedding_rows_are_never_sampled(releases, monkeypatch):
    """TurboSparse's embedding has rows past its tokenizer: they carry no text, so even logits
    that favour them must not produce them (greedy and sampled)."""
    folder = releases["turbosparse-mistral"]
    llm = LLM(str(folder), config=family_config("turbosparse-mistral", folder))
    num_text = llm.engine.tokenizer.vocab_size
    model = llm.engine.model
    real_logits = model.compute_logits

    def favour_padding(hidden):
        logits = real_logits(hidden)
        logits[:, num_text:] += 1e4
        return logits
    monkeypatch.setattr(model, "compute_logits", favour_padding)
    params = [SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=1.0, seed=1, ignore_eos=True)]
    for result in llm.generate([[5, 6, 7], [8, 9]], params):
        assert result.completions[0].token_ids and max(result.completions[0].token_ids) < num_text
