"""Our native model vs transformers (the reference no one here wrote), four FFN flavours."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from sparse_serve.engine.checkpoints.loader import load_model
from sparse_serve.engine.core.config import ModelConfig
from sparse_serve.engine.models.attention import AttentionMetadata
from tests.tiny_checkpoint import make_tiny_checkpoint

ACT_THRESHOLD = 0.05


def reference_model(folder, act: str):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

    raw = json.loads((folder / "config.json").read_text())
    raw.pop("architectures", None)
    is_mistral = raw.pop("model_type") == "mistral"
    raw["hidden_act"] = "silu" if act == "silu" else "relu"
    raw.pop("hidden_act_param", None)
    config_cls, model_cls = (MistralConfig, MistralForCausalLM) if is_mistral else (LlamaConfig, LlamaForCausalLM)
    model = model_cls.from_pretrained(folder, config=config_cls(**raw), attn_implementation="eager",
                                      dtype=torch.float32).eval()
    for layer in model.model.layers:
        mlp = layer.mlp
        if act == "drelu":
            mlp.forward = lambda x, m=mlp: m.down_proj(F.relu(m.gate_proj(x)) * F.relu(m.up_proj(x)))
        elif act == "fatrelu":
            mlp.forward = lambda x, m=mlp: m.down_proj(
                torch.where(m.gate_proj(x) > ACT_THRESHOLD, m.gate_proj(x), 0.0) * m.up_proj(x))
    model.generation_config = GenerationConfig(eos_token_id=None, pad_token_id=2, do_sample=False)
    return model


def ours(folder):
    model, arch = load_model(ModelConfig(dtype="float32", device="cpu", sparse_kernels=False), folder)
    return model


def our_logits(model, ids: list[int]) -> torch.Tensor:
    hidden, _ = model(torch.tensor(ids), torch.arange(len(ids)), AttentionMetadata.for_full_sequences([len(ids)]))
    return model.compute_logits(hidden)


def our_greedy(model, ids: list[int], num_tokens: int) -> list[int]:
    ids = list(ids)
    for _ in range(num_tokens):
        ids.append(int(our_logits(model, ids)[-1].argmax()))
    return ids


@pytest.mark.parametrize("act,kwargs", [
    ("silu", {}),
    ("relu", {}),
    ("drelu", {}),
    ("fatrelu", {"act_threshold": ACT_THRESHOLD}),
    ("silu", {"sliding_window": 8, "tie_word_embeddings": True}),
])
def test_logits_and_greedy_match_transformers(tmp_path, act, kwargs):
    folder = make_tiny_checkpoint(tmp_path / act, act, **kwargs)
    ref, model = reference_model(folder, act), ours(folder)
    ids = torch.randint(3, ref.config.vocab_size, (1, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref_logits = ref(ids).logits[0]
        got = our_logits(model, ids[0].tolist())
    rel = (got - ref_logits).abs().max() / ref_logits.abs().max()
    assert rel < 1e-4, f"max |diff| / max |ref| = {rel:.2e}"

    prompt = ids[:, :5]
    with torch.no_grad():
        expected = ref.generate(prompt, max_new_tokens=32)[0].tolist()
        got_tokens = our_greedy(model, prompt[0].tolist(), 32)
    assert len(expected) == 5 + 32
    assert got_tokens == expected


def test_active_counts_equal_independent_count(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "relu", "relu")
    model = ours(folder)
    ids = torch.randint(3, 200, (9,), generator=torch.Generator().manual_seed(2))
    captured = []
    for layer in model.model.layers:   # independent recomputation of h from the layer's input
        layer.post_attention_layernorm.register_forward_hook(lambda m, inp, out: captured.append(out))
    _, activities = model(ids, torch.arange(9), AttentionMetadata.for_full_sequences([9]))
    for x, mlp, activity in zip(captured, model.mlps, activities):
        h = F.relu(x @ mlp.gate_proj.weight.t()) * (x @ mlp.up_proj.weight.t())
        assert torch.equal(activity.active_counts, (h != 0).sum(-1).to(torch.int32))
        # sparse_kernels=False is the plain eager path: it reads every gate, up and down row
        assert activity.rows_read.tolist() == [mlp.gate_proj.out_features] * 3
        assert activity.predictor_params_read == 0
    counts = torch.stack([a.active_counts for a in activities])
    assert 0 < counts.float().mean() < model.config.intermediate_size   # relu really is sparse here


def test_active_counts_with_predictor(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "drelu", "drelu", predictor_rank=16)
    model = ours(folder)
    assert model.config.predictor_rank == 16 and all(m.use_predictor for m in model.mlps)
    ids = torch.randint(3, 200, (7,), generator=torch.Generator().manual_seed(3))
    normed, residual = [], []

    def capture(module, inputs, output):
        residual.append(inputs[0])
        normed.append(output)

    for layer in model.model.layers:
        layer.post_attention_layernorm.register_forward_hook(capture)
    _, activities = model(ids, torch.arange(7), AttentionMetadata.for_full_sequences([7]))
    for x, r, mlp, activity in zip(normed, residual, model.mlps, activities):
        predicted = mlp.predictor.fc2.weight @ F.relu(mlp.predictor.fc1.weight @ r.t())   # [I, T]
        h = F.relu(x @ mlp.gate_proj.weight.t()) * F.relu(x @ mlp.up_proj.weight.t())
        active = (h != 0) & (predicted.t() > 0)
        assert torch.equal(activity.active_counts, active.sum(-1).to(torch.int32))
        assert (activity.active_counts < (h != 0).sum(-1)).any()   # the predictor really removed some
        assert activity.rows_read.tolist() == [mlp.gate_proj.out_features] * 3   # dense: all rows
        assert activity.predictor_params_read == mlp.predictor.fc1.weight.numel() + mlp.predictor.fc2.weight.numel()
