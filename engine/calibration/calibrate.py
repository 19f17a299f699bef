"""Calibrated activation sparsity for SwiGLU models (CATS thresholds, TEAL-style allocation).

A neuron is inactive for a token when |silu(gate)| <= its layer's threshold. For a per-layer
target sparsity s_l the threshold is the s_l-quantile of |silu(gate)| over calibration tokens.
How the average target is spread over layers:

- uniform: every layer gets the target.
- greedy (TEAL): start dense and repeatedly raise by one step the layer whose step adds the
  least error, until the layers' mean reaches the target. The error of layer l at sparsity s is
  measured once, from one forward + backward pass of the dense model on calibration tokens, as
  a second-order estimate of the loss change (see Calibrator.error_table).
- greedy with measured-loss correction (measure_windows > 0, the default of the CLI and the
  bench): the estimate ranks a layer's levels well but misjudges layers against each other (on
  SmolLM2 it undercharges late layers about 2x relative to early ones). So after a first greedy
  pass each layer alone is sparsified a little past its allocation, the KL divergence from the
  dense model is measured on other calibration windows, that layer's row is rescaled by
  measured / estimated, and the greedy search runs again (see Calibrator.measured_allocation).

Thresholds are then fitted in one forward pass, layer by layer: each layer's quantile is taken on
the inputs it receives with all earlier layers already sparse, so the measured sparsity (the
model's own activity counts) lands on the per-layer targets.
"""
from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from sparse_serve.engine.calibration.perplexity import forward_windows, next_token_targets
from sparse_serve.engine.checkpoints.sparsity_file import METHODS, THRESHOLD_ACTS, SparsityFile, set_thresholds
from sparse_serve.engine.core.config import MODEL_DTYPES, ModelConfig
from sparse_serve.engine.models.attention import AttentionMetadata

logger = logging.getLogger(__name__)

DEFAULT_STEP = 0.05
# Measured-loss correction probes each layer this far above its estimated allocation.
DEFAULT_MEASURE_PROBE = 0.10
MAX_LAYER_SPARSITY = 0.95
# NOTE: a quantile over N*I values needs no more than a few million samples to be exact to
# well under 0.1 points; beyond that we subsample (fixed seed) to bound memory and sort time.
MAX_QUANTILE_SAMPLES = 1 << 22


def abs_silu_gate(mlp, x: torch.Tensor) -> torch.Tensor:
    """|silu(x W_gate^T)|: [T, I]."""
    return F.silu(x @ mlp.gate_proj.weight.t()).abs()


def quantiles(values: torch.Tensor, levels: Sequence[float], seed: int = 0) -> list[float]:
    """Empirical quantiles of a tensor (any shape) at the given levels in [0, 1)."""
    flat = values.reshape(-1).float()
    if flat.numel() > MAX_QUANTILE_SAMPLES:
        gen = torch.Generator(device=flat.device).manual_seed(seed)
        flat = flat[torch.randint(flat.numel(), (MAX_QUANTILE_SAMPLES,), generator=gen,
                                  device=flat.device)]
    last = flat.numel() - 1
    if len(levels) == 1:   # NOTE: one quantile: selection is ~5x faster than a full sort
        level = levels[0]
        return [0.0 if level <= 0 else float(flat.kthvalue(min(last, round(level * last)) + 1).values)]
    ordered = flat.sort().values
    return [0.0 if level <= 0 else float(ordered[min(last, round(level * last))]) for level in levels]


class Calibrator:
    """Captures what calibration needs from one model on fixed calibration windows."""

    def __init__(self, model, windows: Sequence[torch.Tensor], error_windows: int = 4,
                 step: float = DEFAULT_STEP, measure_windows: int = 0,
                 measure_probe: float = DEFAULT_MEASURE_PROBE):
        if {mlp.act for mlp in model.mlps} - set(THRESHOLD_ACTS):
            raise ValueError(f"calibration needs a SwiGLU (silu) model; this one uses "
                             f"{sorted({mlp.act for mlp in model.mlps})}")
        if not 0 < step <= 0.25:
            raise ValueError(f"step must be in (0, 0.25], got {step}")
        self.model = model
        self.windows = list(windows)
        self.error_windows = self.windows[:max(1, error_windows)]
        # NOTE: measured-loss correction uses the *last* calibration windows, so that it does
        # not reuse the windows the estimate was taken on (still never the held-out split).
        self.measure_windows = self.windows[-measure_windows:] if measure_windows > 0 else []
        self.measure_probe = measure_probe
        self.step = step
        self.levels = [i * step for i in range(int(MAX_LAYER_SPARSITY / step + 1e-9) + 1)]
        self._error_table: list[list[float]] | None = None
        self.layer_scales: list[float] | None = None   # set by measured_allocation
        self._measured: dict[tuple[int, int], float] = {}   # (layer, level index) -> loss

    @property
    def num_layers(self) -> int:
        return len(self.model.mlps)

    @property
    def num_tokens(self) -> int:
        return sum(len(w) for w in self.windows)

    # --- sensitivity ------------------------------------------------------------------------

    def error_table(self) -> list[list[float]]:
        """err[l][k]: estimated loss change from sparsifying layer l alone at levels[k].

        NOTE: a second-order (empirical Fisher) estimate from one forward + backward pass of
        the dense model: with g_t = dL/d(out_t) at layer l's FFN output, dropping neurons D
        changes out_t by -sum_{i in D} h_ti * W_down[:, i], so the loss moves by about
        -sum_{i in D} (g_t W_down)_i h_ti and we charge its square, summed over tokens. Unlike
        a raw output error, this sees what the rest of the network does with the change (our
        first try, error relative to the residual stream's energy, put 95% sparsity on the
        middle layers, whose stream is dominated by a few huge channels, and lost 5x in
        perplexity). The dropped set only grows with the level, so each level costs one masked
        sum over [T, I], not a matmul.
        """
        if self._error_table is not None:
            return self._error_table
        start = time.monotonic()
        inputs, grads = self._capture_gradients()
        table = []
        for mlp, x, g in zip(self.model.mlps, inputs, grads):
            with torch.inference_mode():
                s = F.silu(x @ mlp.gate_proj.weight.t())                               # [T, I]
                u = x @ mlp.up_proj.weight.t()                                          # [T, I]
                w_down_t = mlp.w_down_t if mlp.w_down_t is not None else mlp.down_proj.weight.t()
                contrib = (g @ w_down_t.t()) * s * u                                    # [T, I]
                magnitude = s.abs()
                row = []
                for cut in quantiles(magnitude, self.levels):
                    if cut <= 0:
                        row.append(0.0)
                        continue
                    delta = torch.where(magnitude <= cut, contrib, torch.zeros_like(contrib)).sum(-1)
                    row.append(float(delta.double().pow(2).sum()))
            table.append(row)
        logger.info("calibrate: sensitivity table for %d layers x %d levels on %d tokens in %.1fs",
                    self.num_layers, len(self.levels), sum(len(w) for w in self.error_windows),
                    time.monotonic() - start)
        self._error_table = table
        return table

    def _capture_gradients(self):
        """Dense forward + backward of the next-token loss on the error windows:
        per layer FFN inputs [T, H] and dL/d(FFN output) [T, H]."""
        model, mlps = self.model, self.model.mlps
        saved = [(mlp.act_threshold, mlp.use_sparse_kernels) for mlp in mlps]
        inputs, outputs = [], []

        def capture_input(_mlp, args):
            inputs.append(args[0].detach())

        def capture_output(_mlp, _args, result):
            result[0].retain_grad()
            outputs.append(result[0])

        def start_graph(_layer, args):
            # NOTE: weights stay frozen; a leaf at the first layer's input builds the graph.
            return (args[0].detach().requires_grad_(True), *args[1:])

        hooks = [model.model.layers[0].register_forward_pre_hook(start_graph)]
        for mlp in mlps:
            mlp.act_threshold = 0.0
            mlp.use_sparse_kernels = False   # the reference path is differentiable
            hooks.append(mlp.register_forward_pre_hook(capture_input))
            hooks.append(mlp.register_forward_hook(capture_output))
        try:
            with torch.enable_grad():
                hidden, _, _ = forward_windows(model, self.error_windows)
                rows, targets = next_token_targets(self.error_windows, hidden.device)
                loss = F.cross_entropy(model.compute_logits(hidden[rows]), targets, reduction="sum")
                loss.backward()
        finally:
            for hook in hooks:
                hook.remove()
            for mlp, (threshold, sparse) in zip(mlps, saved):
                mlp.act_threshold, mlp.use_sparse_kernels = threshold, sparse
        return inputs, [out.grad.detach() for out in outputs]

    # --- allocation -------------------------------------------------------------------------

    def allocate(self, target: float, method: str, measure: bool = True) -> list[float]:
        """Per-layer sparsity targets whose mean is the target. Greedy uses the measured-loss
        correction when the calibrator has measure windows, unless measure is False."""
        if not 0 <= target <= MAX_LAYER_SPARSITY:
            raise ValueError(f"target sparsity must be in [0, {MAX_LAYER_SPARSITY}], got {target}")
        if method == "uniform":
            return [target] * self.num_layers
        if method != "greedy":
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        if self.measure_windows and measure:
            return self.measured_allocation(target)
        return greedy_allocation(self.error_table(), self.levels, target)

    # --- measured-loss correction -----------------------------------------------------------

    def measured_allocation(self, target: float) -> list[float]:
        """Greedy allocation on the estimated table after rescaling each layer's row by the
        loss change actually measured for that layer near its operating point.

        NOTE: the second-order estimate ranks levels within a layer well but its scale across
        layers is off (it linearizes everything after the layer). So: allocate on the estimate,
        then for every layer alone sparsify it at (its allocation + measure_probe), measure the
        KL divergence of the model's next-token distribution from the dense one on the
        measurement windows (a paired, always positive measure of the loss change), and scale
        the layer's row by measured / estimated at that level; allocate again on the result.
        """
        table = self.error_table()
        first = greedy_allocation(table, self.levels, target)
        probes = [min(len(self.levels) - 1, round((a + self.measure_probe) / self.step))
                  for a in first]
        missing = {l: self.levels[k] for l, k in enumerate(probes) if (l, k) not in self._measured}
        for l, loss in self.measured_layer_losses(missing).items():
            self._measured[(l, probes[l])] = loss
        measured = [self._measured[(l, k)] for l, k in enumerate(probes)]
        scales = [scale_factor(m, row[k]) for m, row, k in zip(measured, table, probes)]
        self.layer_scales = scales
        logger.info("calibrate: measured-loss scales %s",
                    ", ".join(f"{s:.2f}" for s in scales))
        return greedy_allocation(scale_table(table, scales), self.levels, target)

    @torch.inference_mode()
    def measured_layer_losses(self, levels: dict[int, float]) -> dict[int, float]:
        """Summed KL(dense || sparse) over the measurement windows' next-token distributions
        for each layer l in `levels` made sparse alone at levels[l] (threshold = that quantile
        of its own inputs). Runs the dense prefix once and, per layer, only the layers from l on."""
        start = time.monotonic()
        model, windows = self.model, self.measure_windows
        layers = model.model.layers
        saved = [mlp.act_threshold for mlp in model.mlps]
        set_thresholds(model, [0.0] * self.num_layers)
        device = model.lm_head.weight.device
        ids = torch.cat(list(windows)).to(device)
        positions = torch.cat([torch.arange(len(w)) for w in windows]).to(device)
        meta = AttentionMetadata.for_full_sequences([len(w) for w in windows])
        rows, _ = next_token_targets(windows, device)
        try:
            x = model.model.embed_tokens(ids)
            residuals = []
            for layer in layers:
                residuals.append(x)
                x, _ = layer(x, positions, meta)
            dense_logp = F.log_softmax(model.compute_logits(model.model.norm(x)[rows]), dim=-1)
            losses = {}
            for l, level in sorted(levels.items()):
                mlp = layers[l].mlp

                def hook(module, args, level=level):
                    module.act_threshold = quantiles(abs_silu_gate(module, args[0]), [level])[0]

                handle = mlp.register_forward_pre_hook(hook)
                try:
                    x = residuals[l]
                    for layer in layers[l:]:
                        x, _ = layer(x, positions, meta)
                finally:
                    handle.remove()
                    mlp.act_threshold = 0.0
                logp = F.log_softmax(model.compute_logits(model.model.norm(x)[rows]), dim=-1)
                kl = (dense_logp.exp() * (dense_logp - logp)).sum()
                losses[l] = float(kl)
        finally:
            set_thresholds(model, saved)
        logger.info("calibrate: measured single-layer losses for %d layers on %d tokens in %.1fs",
                    len(levels), len(ids), time.monotonic() - start)
        return losses

    # --- thresholds -------------------------------------------------------------------------

    @torch.inference_mode()
    def fit(self, layer_targets: Sequence[float]) -> tuple[list[float], list[float]]:
        """Thresholds hitting each layer's target on the calibration windows, fitted in one
        forward pass (each layer sees earlier layers already thresholded), and the per-layer
        sparsity the model then measured on those windows."""
        if len(layer_targets) != self.num_layers:
            raise ValueError(f"{len(layer_targets)} targets for {self.num_layers} layers")
        set_thresholds(self.model, [0.0] * self.num_layers)

        def make_hook(target: float):
            def hook(mlp, args):
                mlp.act_threshold = quantiles(abs_silu_gate(mlp, args[0]), [target])[0]
            return hook

        hooks = [mlp.register_forward_pre_hook(make_hook(t))
                 for mlp, t in zip(self.model.mlps, layer_targets)]
        try:
            _, activities, _ = forward_windows(self.model, self.windows)
        finally:
            for hook in hooks:
                hook.remove()
        inter = self.model.config.intermediate_size
        measured = [1.0 - float(a.active_counts.double().mean()) / inter for a in activities]
        return [mlp.act_threshold for mlp in self.model.mlps], measured


def greedy_allocation(error_table: list[list[float]], levels: Sequence[float],
                      target: float) -> list[float]:
    """TEAL's greedy search on a per-layer error table: repeatedly take one step on the layer
    whose next step costs least, until the mean level reaches the target."""
    num_layers = len(error_table)
    step = levels[1] - levels[0]
    num_steps = round(target * num_layers / step)
    index = [0] * num_layers
    for _ in range(num_steps):
        best, best_cost = None, float("inf")
        for layer, k in enumerate(index):
            if k + 1 >= len(levels):
                continue
            cost = error_table[layer][k + 1] - error_table[layer][k]
            if cost < best_cost:
                best, best_cost = layer, cost
        if best is None:
            break
        index[best] += 1
    return [levels[k] for k in index]


def scale_factor(measured: float, estimated: float, floor: float = 1e-3) -> float:
    """measured / estimated, kept positive and finite: an estimate or a measurement at (or
    below) zero says nothing about scale, so it leaves the row as it is (factor 1)."""
    if not estimated > 0 or not measured > 0:
        return 1.0
    return max(floor, measured / estimated)


def scale_table(error_table: list[list[float]], scales: Sequence[float]) -> list[list[float]]:
    """Each layer's row of the error table times that layer's scale."""
    if len(scales) != len(error_table):
        raise ValueError(f"{len(scales)} scales for {len(error_table)} layers")
    return [[value * scale for value in row] for row, scale in zip(error_table, scales)]


def calibrate(model, windows: Sequence[torch.Tensor], target: float, method: str = "greedy",
              step: float = DEFAULT_STEP, error_windows: int = 4, model_name: str = "",
              calibrator: Calibrator | None = None, measure_windows: int = 0,
              measure: bool = True) -> SparsityFile:
    """Calibrate per-layer thresholds for one target and return the sidecar (not yet written).
    Leaves the thresholds set on the model."""
    calibrator = calibrator or Calibrator(model, windows, error_windows=error_windows, step=step,
                                          measure_windows=measure_windows)
    start = time.monotonic()
    layer_targets = calibrator.allocate(target, method, measure=measure)
    measured_loss = method == "greedy" and measure and bool(calibrator.measure_windows)
    thresholds, measured = calibrator.fit(layer_targets)
    logger.info("calibrate: %s target %.3f -> measured %.4f on %d calibration tokens (%.1fs)",
                method, target, sum(measured) / len(measured), calibrator.num_tokens,
                time.monotonic() - start)
    cfg = model.config
    return SparsityFile(
        model=model_name, act="silu", target_sparsity=target, method=method,
        thresholds=thresholds, layer_sparsity=measured, num_layers=cfg.num_layers,
        intermediate_size=cfg.intermediate_size,
        calibration={"data": "stdlib docstrings (calibration split)",
                     "num_windows": len(calibrator.windows),
                     "window_tokens": len(calibrator.windows[0]) if calibrator.windows else 0,
                     "num_tokens": calibrator.num_tokens, "step": calibrator.step,
                     "error_windows": len(calibrator.error_windows),
                     "layer_targets": layer_targets,
                     **({"measure_windows": len(calibrator.measure_windows),
                         "measure_probe": calibrator.measure_probe,
                         "layer_scales": [round(x, 4) for x in calibrator.layer_scales]}
                        if measured_loss else {})})


# --- CLI: sparse-serve calibrate ------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sparse-serve calibrate",
        description="Pick per-layer activation thresholds for a SwiGLU model from stdlib "
                    "docstrings (no download) and write a sidecar for `serve --sparsity FILE`.")
    parser.add_argument("--model", help="local model folder (default: the embedded default model)")
    parser.add_argument("--target-sparsity", type=float, required=True,
                        help="mean fraction of inactive FFN neurons, e.g. 0.4")
    parser.add_argument("--out", required=True, help="sidecar JSON to write")
    parser.add_argument("--method", choices=METHODS, default="greedy",
                        help="per-layer allocation (default: greedy by measured sensitivity)")
    parser.add_argument("--num-windows", type=int, default=8, help="calibration windows")
    parser.add_argument("--window", type=int, default=256, help="tokens per window")
    parser.add_argument("--error-windows", type=int, default=4,
                        help="windows used to measure per-layer sensitivity (greedy)")
    parser.add_argument("--measure-windows", type=int, default=2,
                        help="windows on which each layer's loss is measured to rescale the "
                             "greedy estimate (0: estimate only)")
    parser.add_argument("--step", type=float, default=DEFAULT_STEP, help="greedy step size")
    parser.add_argument("--dtype", default="float32", choices=MODEL_DTYPES)
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--log-level", default="info",
                        choices=("critical", "error", "warning", "info", "debug"))
    return parser


def load_for_calibration(model_path: str | None, dtype: str, device: str):
    """(model, tokenizer, folder) with every layer dense, whatever the folder's config says."""
    from sparse_serve.engine.checkpoints.default_model import default_model_path
    from sparse_serve.engine.checkpoints.loader import load_model
    from sparse_serve.engine.text.tokenizer import Tokenizer

    folder = model_path or default_model_path()
    # NOTE: no sparsity_file here: calibration always starts from the dense model.
    model, _ = load_model(ModelConfig(path=folder, dtype=dtype, device=device), folder)
    return model, Tokenizer.from_pretrained(folder), folder


def main_calibrate(argv: Sequence[str] | None = None) -> int:
    from sparse_serve.engine.calibration.calibration_data import load_windows
    from sparse_serve.engine.checkpoints.sparsity_file import write_sparsity_file
    from sparse_serve.engine.core.errors import ModelLoadError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not 0 <= args.target_sparsity <= MAX_LAYER_SPARSITY:
        logger.error("--target-sparsity must be in [0, %.2f]", MAX_LAYER_SPARSITY)
        return 2
    try:
        model, tokenizer, folder = load_for_calibration(args.model, args.dtype, args.device)
    except ModelLoadError as exc:
        logger.error("%s", exc)
        return 1
    if {mlp.act for mlp in model.mlps} != {"silu"}:
        logger.error("%s: calibration needs a SwiGLU (silu) model", folder)
        return 1
    windows = load_windows(tokenizer, "calibration", args.window, args.num_windows)
    sidecar = calibrate(model, windows, args.target_sparsity, args.method, step=args.step,
                        error_windows=args.error_windows, model_name=Path(folder).name,
                        measure_windows=args.measure_windows)
    write_sparsity_file(args.out, sidecar)
    logger.info("wrote %s: %s allocation, measured sparsity %.3f on the calibration set",
                args.out, args.method, sidecar.mean_layer_sparsity)
    return 0
