"""CPU decode steps of an int8 model through one native call (engine/models/fused_decode_cpu.py)
against the layer-by-layer path, step by step inside real generations: same hidden states to
fp32 rounding, same KV-cache writes, and the same per-layer counts (active neurons per token,
rows read, predictor weights read); and the steps it must leave to the layer-by-layer path."""
from __future__ import annotations

import pytest
import torch

from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.kernels import decode_layers_cpu
from tests.tiny_checkpoint import make_tiny_checkpoint

pytestmark = pytest.mark.skipif(not decode_layers_cpu.available(), reason="native CPU kernels did not build")

NUM_TOKENS = 12
# The two paths norm in different orders, so an activation an fp32 rounding apart may land on
# the next point of its grid (1/8191 of its row's largest value for int8, 1/127 for w8a8;
# kernels/activation_grid.py) in one path and not the other: relative errors of a few grid
# steps, not fp32 rounding. Measured: up to 1.6e-4 (int8); 2.8e-7 (w8a8: no point crossed).
GRID_TOLERANCE = {"int8": 1e-3, "w8a8": 3e-2, "int4": 1e-3, "w4a8": 3e-2}
# (activation, checkpoint options): exact-mode ReLU, CATS-thresholded SwiGLU, dReLU with
# predictors (TurboSparse), and a Mistral sliding window shorter than the generations.
CASES = {
    "relu": ("relu", {}),
    "silu-cats": ("silu", {"act_threshold": 0.05}),
    "drelu-predictor": ("drelu", {"predictor_rank": 16}),
    # thresholds calibrated per layer (bench/gpu_e2e.py does so), set after loading
    "per-layer-thresholds": ("drelu", {"predictor_rank": 16}),
    "sliding-window": ("relu", {"sliding_window": 8}),
    # 8-bit activations (`--quantization w8a8`)
    "w8a8-drelu-predictor": ("drelu", {"predictor_rank": 16}),
    # 4-bit rows (`--quantization int4` / `w4a8`)
    "int4-silu-cats": ("silu", {"act_threshold": 0.05}),
    "w4a8-drelu-predictor": ("drelu", {"predictor_rank": 16}),
}


def _prompts(count: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(count)
    return [torch.randint(3, 290, (int(torch.randint(2, 30, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(count)]


class StepChecker:
    """Wraps model.forward: every decode step runs layer by layer first (on a copy of the KV
    cache's state), then fused, and the two are compared; the fused result is returned."""

    def __init__(self, model, tolerance: float):
        self.model, self.forward, self.tolerance = model, model.forward, tolerance
        self.fused_steps = self.other_steps = 0
        self.max_error = 0.0
        self.max_kv_error = 0.0

    def __call__(self, input_ids, positions, meta):
        caches = [layer.self_attn.kv_cache for layer in self.model.model.layers]
        saved = [(k.clone(), v.clone()) for k, v in caches]
        self.model.fused_cpu_decode = False
        ref_hidden, ref_activities = self.forward(input_ids, positions, meta)
        ref_caches = [(k.clone(), v.clone()) for k, v in caches]
        for (k, v), (k0, v0) in zip(caches, saved):
            k.copy_(k0)
            v.copy_(v0)
        self.model.fused_cpu_decode = True
        ran = []
        run = self.model._fused.run
        self.model._fused.run = lambda *a: ran.append(run(*a)) or ran[-1]
        try:
            hidden, activities = self.forward(input_ids, positions, meta)
        finally:
            del self.model._fused.run
        if ran[0] is None:
            self.other_steps += 1
            assert not meta.is_decode_only, "a decode step of an int8 model did not take the fused path"
            return hidden, activities
        self.fused_steps += 1
        scale = max(1.0, ref_hidden.abs().max().item())
        error = (hidden - ref_hidden).abs().max().item() / scale
        self.max_error = max(self.max_error, error)
        assert error < self.tolerance, error
        for (k, v), (rk, rv) in zip(caches, ref_caches):
            kv_error = max((k - rk).abs().max().item(), (v - rv).abs().max().item()) / scale
            self.max_kv_error = max(self.max_kv_error, kv_error)
            assert kv_error < self.tolerance, kv_error
        for got, want in zip(activities, ref_activities, strict=True):
            assert torch.equal(got.active_counts, want.active_counts)
            assert got.rows_read.tolist() == want.rows_read.tolist()
            assert got.predictor_params_read == want.predictor_params_read
        return hidden, activities


@pytest.mark.parametrize("case", CASES)
def test_fused_steps_equal_layer_by_layer(tmp_path, case):
    act, options = CASES[case]
    folder = make_tiny_checkpoint(tmp_path / "m", act, **options)
    # a small KV cache: the checker copies all of it twice per step
    method = next((m for m in ("w8a8", "int4", "w4a8") if case.startswith(m)), "int8")
    llm = LLM(str(folder), **{"model.device": "cpu", "model.dtype": "float32", "model.quantization": method,
                              "cache.kv_cache_bytes": 2 << 20})
    model = llm.engine.model
    if case == "per-layer-thresholds":
        for i, mlp in enumerate(model.mlps):
            mlp.predictor_threshold = 0.2 * i - 0.1
            mlp.act_threshold = 0.05 * i
    checker = StepChecker(model, GRID_TOLERANCE[method])
    model.forward = checker
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    fused_tokens = [r.completions[0].token_ids for r in llm.generate(_prompts(6), params)]
    assert checker.fused_steps >= NUM_TOKENS - 1 and checker.other_steps >= 1
    # and the whole generation, layer by layer, gives the same tokens
    del model.forward
    model.fused_cpu_decode = False
    assert [r.completions[0].token_ids for r in llm.generate(_prompts(6), params)] == fused_tokens


def test_steps_it_leaves_to_the_layers(tmp_path):
    """Float weights, a shadow-check step and a forced dense fallback run layer by layer."""
    folder = make_tiny_checkpoint(tmp_path / "m", "drelu", predictor_rank=16)
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    float_llm = LLM(str(folder), **{"model.device": "cpu", "model.dtype": "float32"})
    calls = []
    fused = float_llm.engine.model._fused
    run = fused.run
    fused.run = lambda *a: calls.append(run(*a)) or calls[-1]
    float_llm.generate(_prompts(2), params)
    assert calls and all(c is None for c in calls)

    llm = LLM(str(folder), **{"model.device": "cpu", "model.dtype": "float32", "model.quantization": "int8"})
    model = llm.engine.model
    assert model._fused._static_ok()
    model.mlps[1].shadow_check = True
    assert not model._fused._static_ok()
    model.mlps[1].shadow_check = False
    model.mlps[0].dense_fallback_fraction = 0.5
    assert not model._fused._static_ok()


def test_a_second_engine_on_the_same_model_rebuilds_the_table(tmp_path):
    """Each engine allocates its own KV cache (and packs weights that are not on huge pages yet):
    the pointer table must follow (bench/gpu_e2e.py builds several engines on one model)."""
    from sparse_serve.engine.core.llm_engine import LLMEngine

    folder = make_tiny_checkpoint(tmp_path / "m", "drelu", predictor_rank=16)
    llm = LLM(str(folder), **{"model.device": "cpu", "model.dtype": "float32", "model.quantization": "int8"})
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True)
    first = [r.completions[0].token_ids for r in llm.generate(_prompts(3), params)]
    model, fused = llm.engine.model, llm.engine.model._fused
    old_key = fused._key
    llm.engine = LLMEngine(llm.engine.config, str(folder), loaded=(model, llm.engine.arch))
    assert [r.completions[0].token_ids for r in llm.generate(_prompts(3), params)] == first
    assert fused._key != old_key


def test_shadow_check_steps_run_layer_by_layer(tmp_path):
    """The runner flips shadow checks per step: those steps (a second, dense pass per layer)
    leave the fused path, and the steps around them take it again."""
    folder = make_tiny_checkpoint(tmp_path / "m", "drelu", predictor_rank=16)
    llm = LLM(str(folder), **{"model.device": "cpu", "model.dtype": "float32", "model.quantization": "int8",
                              "server.predictor_shadow_rate": 0.5})
    model = llm.engine.model
    fused, run, calls = model._fused, model._fused.run, []
    fused.run = lambda x, positions, meta: calls.append(
        (meta.is_decode_only, model.mlps[0].shadow_check, run(x, positions, meta))) or calls[-1][2]
    llm.generate(_prompts(2), SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, ignore_eos=True))
    decode = [(shadow, result is not None) for is_decode, shadow, result in calls if is_decode]
    assert {shadow for shadow, _ in decode} == {True, False}
    assert all(took != shadow for shadow, took in decode)
