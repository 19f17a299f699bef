"""`sparse-serve train-predictors` on tiny models: held-out recall at a stated threshold, the
published tensor names in the output folder, and greedy output close to the exact model's."""
from __future__ import annotations

import json

import pytest
import torch

from sparse_serve.engine.calibration.calibrate import calibrate
from sparse_serve.engine.calibration.calibration_data import load_windows
from sparse_serve.engine.calibration.perplexity import forward_windows
from sparse_serve.engine.checkpoints.loader import checkpoint_entries, load_model
from sparse_serve.engine.checkpoints.sparsity_file import write_sparsity_file
from sparse_serve.engine.core.config import EngineConfig, ModelConfig
from sparse_serve.engine.core.llm import LLM
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.predictors.cli import main_train_predictors, train_predictors
from sparse_serve.engine.predictors.train import TrainSettings, evaluate_layer
from sparse_serve.engine.text.tokenizer import Tokenizer
from tests.tiny_checkpoint import make_tiny_checkpoint

CPU = ModelConfig(dtype="float32", device="cpu", sparse_kernels=False)
RANK = 32                  # half the hidden size of the tiny model
THRESHOLD = 0.0            # the stated threshold: PowerInfer's default, our serve default
LOW_THRESHOLD = -4.0       # a recall-first setting of the serve-time knob
PROMPTS = ["The capital of France is", "Hello world,", "Neurons that are silent",
           "def main():", "Sparse serving"]
WINDOW_ARGS = ["--num-windows", "48", "--heldout-windows", "16", "--window", "64"]


@pytest.fixture(scope="module")
def relu_model_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("relu") / "model", "relu", num_layers=2,
                                hidden_size=64, intermediate_size=128)


@pytest.fixture(scope="module")
def trained_dir(relu_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("trained") / "with-predictors"
    assert main_train_predictors(["--model", str(relu_model_dir), "--rank", str(RANK), "--out", str(out),
                                  "--threshold", str(THRESHOLD), *WINDOW_ARGS]) == 0
    return out


def test_heldout_recall_above_090_at_threshold_0(trained_dir):
    report = json.loads((trained_dir / "predictors.json").read_text())
    assert report["rank"] == RANK and report["threshold"] == THRESHOLD
    layers = report["heldout"]["layers"]
    assert report["heldout"]["num_tokens"] == 16 * 64 and len(layers) == 2
    for layer in layers:
        assert layer["recall"] > 0.9, layer
        # not a predictor that says "everything": it skips a real share of the silent neurons
        assert layer["predicted_density"] < layer["exact_density"] + 0.6 * (1 - layer["exact_density"]), layer
        assert layer["precision"] > layer["exact_density"], layer


def test_output_folder_has_published_names_and_loads(relu_model_dir, trained_dir):
    entries = checkpoint_entries(trained_dir)
    for i in range(2):
        fc1 = entries[f"model.layers.{i}.mlp.predictor.fc1.weight"]
        fc2 = entries[f"model.layers.{i}.mlp.predictor.fc2.weight"]
        assert (fc1.shape, fc2.shape) == ((RANK, 64), (128, RANK))
        assert fc1.path.name == "model-predictors.safetensors"
    assert not any(name.endswith(".bias") for name in entries)
    model, arch = load_model(CPU, trained_dir)
    assert arch.predictor_ranks == [RANK, RANK] and all(m.use_predictor for m in model.mlps)
    exact, _ = load_model(CPU, relu_model_dir)
    assert torch.equal(model.model.layers[1].mlp.up_proj.weight, exact.model.layers[1].mlp.up_proj.weight)


def greedy_tokens(folder, **overrides) -> list[list[int]]:
    config = EngineConfig.load(overrides={"model.path": str(folder), "model.device": "cpu",
                                          "model.dtype": "float32", "cache.kv_cache_bytes": 4 << 20,
                                          "cache.block_size": 4, **overrides})
    results = LLM(str(folder), config=config).generate(
        PROMPTS, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True))
    return [r.completions[0].token_ids for r in results]


def positional_agreement(a: list[list[int]], b: list[list[int]]) -> float:
    return sum(x == y for s, t in zip(a, b) for x, y in zip(s, t)) / sum(len(s) for s in a)


@torch.inference_mode()
def teacher_forced_agreement(exact_dir, trained_dir, continuations, threshold: float) -> float:
    """Top-1 agreement of the next token at each generated position, both models reading the
    exact model's own greedy text (no compounding after a first difference)."""
    tokenizer = Tokenizer.from_pretrained(str(exact_dir))
    exact, _ = load_model(CPU, exact_dir)
    cfg = ModelConfig(dtype="float32", device="cpu", sparse_kernels=False, predictor_threshold=threshold)
    predicted, _ = load_model(cfg, trained_dir)
    same = total = 0
    for prompt, continuation in zip(PROMPTS, continuations):
        ids = tokenizer.encode(prompt, add_special_tokens=False) + continuation
        window = torch.tensor(ids)
        rows = slice(len(ids) - len(continuation) - 1, len(ids) - 1)
        choices = []
        for model in (exact, predicted):
            hidden, _, _ = forward_windows(model, [window])
            choices.append(model.compute_logits(hidden[rows]).argmax(-1))
        same += int((choices[0] == choices[1]).sum())
        total += len(continuation)
    return same / total


def test_greedy_agreement_with_exact(relu_model_dir, trained_dir):
    exact = greedy_tokens(relu_model_dir)
    forced = teacher_forced_agreement(relu_model_dir, trained_dir, exact, THRESHOLD)
    free = {t: positional_agreement(exact, greedy_tokens(trained_dir, **{"model.predictor_threshold": t}))
            for t in (THRESHOLD, LOW_THRESHOLD)}
    print(f"greedy-token agreement with exact, 5 prompts x 16 tokens, rank {RANK}: teacher-forced "
          f"{forced:.3f} at threshold {THRESHOLD}; free-running {free[THRESHOLD]:.3f} at "
          f"{THRESHOLD}, {free[LOW_THRESHOLD]:.3f} at {LOW_THRESHOLD}")
    # NOTE: a random 2-layer model is the hard case (flat gate spectrum, near-tied logits):
    # ~5% missed neurons at threshold 0 flip 0.29 of its greedy choices (0.25 free-running)
    assert forced >= 0.65
    # the serve-time knob trades speed for recall: a low threshold reproduces the exact text
    # while still skipping neurons (held-out figures in test_threshold_sweep)
    assert free[LOW_THRESHOLD] >= 0.9
    # with the predictor switched off the output folder is the exact model
    assert greedy_tokens(trained_dir, **{"model.use_predictor": False}) == exact


def test_threshold_sweep(relu_model_dir, trained_dir):
    """The serve-time knob on held-out tokens: lower threshold, more recall, more neurons read."""
    from sparse_serve.engine.predictors.collect import collect
    from sparse_serve.engine.predictors.train import evaluate_layer as evaluate

    model, _ = load_model(CPU, trained_dir)
    heldout = collect(model, load_windows(Tokenizer.from_pretrained(str(trained_dir)), "heldout", 64, 16))
    sweep = {}
    for threshold in (1.0, THRESHOLD, -2.0, LOW_THRESHOLD):
        layers = [evaluate(m.predictor.fc1.weight, m.predictor.fc2.weight, s, threshold)
                  for m, s in zip(model.mlps, heldout)]
        sweep[threshold] = (sum(m.recall for m in layers) / 2, sum(m.predicted_density for m in layers) / 2)
        print(f"threshold {threshold:+.1f}: recall {sweep[threshold][0]:.3f}, predicted active "
              f"{sweep[threshold][1]:.3f} (exact {layers[0].exact_density:.3f})")
    recalls = [sweep[t][0] for t in sorted(sweep)]
    densities = [sweep[t][1] for t in sorted(sweep)]
    assert recalls == sorted(recalls, reverse=True) and densities == sorted(densities, reverse=True)
    assert sweep[LOW_THRESHOLD][1] < 0.97     # even recall-first, some gate rows are skipped


def test_swiglu_needs_calibrated_thresholds(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "silu", "silu", num_layers=2)
    assert main_train_predictors(["--model", str(folder), "--rank", "16", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()


def test_swiglu_predictor_learns_the_thresholded_gate(tmp_path):
    folder = make_tiny_checkpoint(tmp_path / "silu", "silu", num_layers=2, hidden_size=64,
                                  intermediate_size=128)
    model, _ = load_model(CPU, folder)
    tokenizer = Tokenizer.from_pretrained(str(folder))
    windows = load_windows(tokenizer, "calibration", 64, 48)
    sidecar = calibrate(model, windows[:8], 0.5, "uniform")
    write_sparsity_file(tmp_path / "sparsity.json", sidecar)
    heldout = load_windows(tokenizer, "heldout", 64, 16)
    _, metrics = train_predictors(model, windows, heldout, TrainSettings(rank=RANK))
    for layer in metrics:
        assert 0.35 < layer["exact_density"] < 0.65, layer     # the targets: ~50% silent by threshold
        assert layer["recall"] > 0.85, layer
        # NOTE: no precision claim: |silu(g)| <= t is a band around g = 0 (plus very negative g),
        # which a low-rank relu predictor barely separates; docs/CHECKPOINTS.md has the figures
        assert layer["predicted_density"] < 1.0, layer
    out = tmp_path / "out"
    assert main_train_predictors(["--model", str(folder), "--rank", "16", "--out", str(out),
                                  "--sparsity", str(tmp_path / "sparsity.json"), *WINDOW_ARGS]) == 0
    served, _ = load_model(ModelConfig(dtype="float32", device="cpu", sparsity_file=str(tmp_path / "sparsity.json")), out)
    assert all(m.use_predictor and m.act_threshold > 0 for m in served.mlps)


def test_evaluate_layer_counts():
    from sparse_serve.engine.predictors.collect import LayerSamples

    fc1 = torch.eye(2)
    fc2 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    truth = torch.tensor([[True, False, False], [True, True, False]])
    metrics = evaluate_layer(fc1, fc2, LayerSamples(x, truth))
    # predicted: row 0 -> [1, 0, 0]; row 1 -> [0, 1, 0]
    assert (metrics.recall, metrics.precision) == (2 / 3, 1.0)
    assert metrics.predicted_density == 2 / 6 and metrics.exact_density == 3 / 6


def test_cli_wiring(capsys):
    from sparse_serve.server.cli import build_parser, config_overrides, main

    with pytest.raises(SystemExit) as exit_info:
        main(["train-predictors", "--help"])
    assert exit_info.value.code == 0 and "--rank" in capsys.readouterr().out
    args = build_parser().parse_args(["serve", "--predictor-threshold", "-1.5"])
    assert config_overrides(args, environ={})["model.predictor_threshold"] == -1.5
    assert EngineConfig.load(overrides=config_overrides(args, environ={})).model.predictor_threshold == -1.5
