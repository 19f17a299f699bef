"""Served decode, end to end, at TurboSparse-Mistral-7B's shape: the real engine on random weights.

Builds a Bamboo (dReLU) model with TurboSparse-Mistral-7B's published geometry (32 layers, hidden
4096, intermediate 14336, 32 heads, 8 KV heads, vocab 32064, rank-1024 predictors) in memory with
random bf16 weights, sets each layer's predictor threshold so that about --predicted of its neurons
are predicted on a calibration prompt, and runs the engine (scheduler, runner, sampler, CUDA graphs)
on it. For every batch size, B requests of --prompt-len random tokens generate --gen-len tokens each
(greedy, EOS ignored); the decode time is the median duration of the engine's decode-only steps.

Variants: `sparse` (predictor + sparse kernels, CUDA graphs), `sparse-int8pred` (the same with
the predictors' weights as int8 copies with per-row scales: what a lower-precision predictor saves,
issue 17), `eager` (sparse with --enforce-eager), `dense` (same engine, predictor off, dense FFN),
and `transformers` (MistralForCausalLM with the
same dense weights, `generate` with a static cache, which transformers compiles with torch.compile
on a GPU). The byte floor is the bytes a decode step must read (weights, at the measured computed
fraction of the FFN for the sparse variants, plus the KV cache at the mean context) over the copy
bandwidth measured on the device. The tokenizer is a word-level one written by the script (one
word per id of the shape's vocabulary): it needs no model files and no packages beyond a GPU host's
torch, triton and transformers (bench/device_env.sh makes the repository importable there).

    python bench/gpu_e2e.py --out docs/benchmarks/gpu_e2e.md          # on a GPU (~4 min on an H100)
    python bench/gpu_e2e.py --shape tiny --device cpu --batches 1 2 --gen-len 8   # smoke run
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import logging
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from sparse_serve.engine.core.config import EngineConfig
from sparse_serve.engine.core.llm_engine import LLMEngine
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.models.arch_config import ModelArchConfig
from sparse_serve.engine.models.attention import AttentionMetadata
from sparse_serve.engine.models.llama import CausalLM
from sparse_serve.engine.models.quantized import (
    HEAD_WEIGHT_BITS,
    QUANTIZATION_METHODS,
    WEIGHT_BITS,
    quantize_model,
    quantize_predictor,
)
from sparse_serve.kernels.int4_rows import GROUP, GROUP_BYTES

logger = logging.getLogger("sparse_serve.bench.gpu_e2e")

SHAPES = {
    # TurboSparse-Mistral-7B as published (config.json of the Instruct checkpoint)
    "mistral7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=32064, rank=1024),
    "tiny": dict(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rank=16),
}
VARIANTS = ("sparse", "sparse-int8pred", "eager", "dense", "transformers")


@dataclass
class Row:
    variant: str
    batch: int
    step_ms: float = math.nan              # median decode step
    active: float = math.nan               # mean active fraction of FFN neurons per token
    computed: float = math.nan             # mean computed fraction of the FFN per step (batch union)
    floor_ms: float = math.nan
    note: str = ""

    @property
    def tok_s(self) -> float:
        return self.batch / self.step_ms * 1e3


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    arch: ModelArchConfig
    model: CausalLM
    tokenizer_path: str
    bandwidth: float = 0.0                 # bytes/s, copy
    weight_bytes: float = 0                # per attention / FFN weight as served (int8: 1, 4-bit rows: 17/32)
    head_bytes: float = 0                  # per lm_head weight as served (1 under any --quantization)
    rows: list[Row] = field(default_factory=list)


def shape_arch(shape: dict, max_len: int) -> ModelArchConfig:
    raw = {"architectures": ["BambooForCausalLM"], "model_type": "bamboo", "hidden_act": "relu",
           "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "max_position_embeddings": max_len,
           "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
           **{k: v for k, v in shape.items() if k != "rank"}}
    arch = ModelArchConfig.from_dict(raw, source="bench shape")
    arch.predictor_rank = shape["rank"]
    return arch


def numbered_tokenizer(vocab_size: int, folder: str) -> str:
    """A word-level tokenizer whose ids are words "<s>", "</s>", "w3", "w4", ... up to vocab_size: the
    prompts are random ids, so the bench needs only ids that decode, not a real vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(folder)
    return folder


@torch.no_grad()
def random_model(arch: ModelArchConfig, device: torch.device, dtype: torch.dtype, seed: int) -> CausalLM:
    """Random weights, allocated once in `dtype` on the device (no float32 copy of 7B params)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = CausalLM(arch).to(dtype)
    model.to_empty(device=device)
    for name, p in model.named_parameters():
        if p.dim() == 1:
            p.fill_(1.0)                                             # norm weights
        else:
            p.normal_(0.0, 1.0 / math.sqrt(p.shape[1]))
    for mlp in model.mlps:
        mlp.prepare_for_inference()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def calibrate_predictors(model: CausalLM, predicted: float, num_tokens: int, seed: int) -> None:
    """Each layer's threshold: the (1 - predicted) quantile of its predictor's logits on a random
    prompt, run uncached through the model (the predictor reads the residual before the norm)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (num_tokens,), generator=gen).to(model.lm_head.weight.device)

    def set_threshold(mlp, args):
        residual = args[1]
        fc1, fc2 = mlp.predictor.fc1.weight, mlp.predictor.fc2.weight
        logits = F.linear(F.relu(F.linear(residual, fc1)), fc2).float().flatten()
        k = max(1, int(predicted * logits.numel()))
        mlp.predictor_threshold = max(float(logits.topk(k).values[-1]), 0.0)

    hooks = [mlp.register_forward_pre_hook(set_threshold) for mlp in model.mlps]
    try:
        model(ids, torch.arange(num_tokens, device=ids.device), AttentionMetadata.for_full_sequences([num_tokens]))
    finally:
        for hook in hooks:
            hook.remove()


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync(device)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        dst.copy_(src)
        sync(device)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / min(times)                                   # read + write


def quantize_for_serving(model: CausalLM, method: str) -> None:
    """What the loader does for `--quantization`: int8 in place (each bf16 weight is freed as its
    int8 copy replaces it); the rest (norms, the embedding) becomes float32, the activation dtype
    the int8 kernels and the one-call decode take."""
    quantize_model(model, method)
    gc.collect()
    model.float()


@contextlib.contextmanager
def int8_predictors(model: CausalLM):
    """The predictors' fc1/fc2 as int8 copies with per-row scales (engine/models/quantized.py
    quantize_predictor) for the duration; the stored weights come back after."""
    predictors = [mlp.predictor for mlp in model.mlps if mlp.predictor is not None]
    assert all(p.fc1_scale is None for p in predictors), "the predictors are int8 already"
    stored = [(p.fc1.weight, p.fc2.weight) for p in predictors]
    for predictor in predictors:
        quantize_predictor(predictor)
    try:
        yield
    finally:
        for predictor, (fc1, fc2) in zip(predictors, stored):
            predictor.fc1.weight, predictor.fc2.weight = fc1, fc2
            predictor.fc1_scale = predictor.fc2_scale = None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def floor_ms(ctx: Context, batch: int, ffn_fraction: float, with_predictor: bool,
             predictor_bytes: int = 0) -> float:
    """Bytes one decode step must read / copy bandwidth (weights at their served size, the KV
    cache and embedding rows in the engine's dtype)."""
    arch, elem, weight = ctx.arch, ctx.dtype.itemsize, ctx.weight_bytes or ctx.dtype.itemsize
    h, inter, layers = arch.hidden_size, arch.intermediate_size, arch.num_layers
    qkv = (arch.num_heads + 2 * arch.num_kv_heads) * arch.head_dim * h
    attn = layers * (qkv + arch.num_heads * arch.head_dim * h)
    ffn = layers * 3 * h * inter * ffn_fraction
    predictor = layers * arch.predictor_rank * (h + inter) if with_predictor else 0
    head = arch.vocab_size * h                                       # lm_head
    context = ctx.args.prompt_len + ctx.args.gen_len / 2
    kv = batch * context * 2 * layers * arch.num_kv_heads * arch.head_dim + batch * h   # + embedding rows
    # the predictor at its own size (predictor_bytes: 1 for int8 copies), the rest at the weights'
    weights = (attn + ffn) * weight + head * (ctx.head_bytes or weight) + predictor * (predictor_bytes or weight)
    return (weights + kv * elem) / ctx.bandwidth * 1e3


def engine_config(ctx: Context, variant: str) -> EngineConfig:
    args = ctx.args
    max_len = args.prompt_len + args.gen_len + 16
    max_batch = max(args.batches)
    blocks = max_batch * -(-max_len // 16) + 8
    return EngineConfig.load(overrides={
        "model.device": str(ctx.device), "model.dtype": str(ctx.dtype).removeprefix("torch."),
        "model.max_model_len": max_len, "model.enforce_eager": variant == "eager",
        "scheduler.max_num_seqs": max_batch,
        "scheduler.max_num_batched_tokens": max(2048, args.prompt_len * 4),
        "cache.enable_prefix_caching": False, "cache.num_blocks": blocks})


def run_engine(ctx: Context, variant: str) -> None:
    sparse = variant != "dense"
    for mlp in ctx.model.mlps:
        mlp.use_predictor = sparse
        mlp.use_sparse_kernels = sparse
    for layer in ctx.model.model.layers:          # the previous engine's KV cache goes first
        layer.self_attn.kv_cache = None
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()
    started = time.perf_counter()
    engine = LLMEngine(engine_config(ctx, variant), ctx.tokenizer_path, loaded=(ctx.model, ctx.arch))
    logger.info("%s: engine ready in %.1f s", variant, time.perf_counter() - started)
    gen = torch.Generator().manual_seed(ctx.args.seed)
    # warm-up: first-call costs (kernel compiles, allocator growth) stay out of the timings
    engine.add_request(_request(f"{variant}-warmup", list(range(3, 3 + ctx.args.prompt_len)),
                                SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
    while engine.has_unfinished():
        engine.step()
    params = SamplingParams(max_tokens=ctx.args.gen_len, temperature=0.0, ignore_eos=True)
    for batch in ctx.args.batches:
        for i in range(batch):
            ids = torch.randint(3, ctx.arch.vocab_size, (ctx.args.prompt_len,), generator=gen).tolist()
            engine.add_request(_request(f"{variant}-{batch}-{i}", ids, params))
        steps, active, computed = [], [], []
        while engine.has_unfinished():
            stats = engine.step().stats
            if stats is not None and stats.num_prefill_tokens == 0 and stats.num_decode_tokens == batch:
                steps.append(stats.duration_s)
                active.append(statistics.fmean(stats.per_layer_active_fraction))
                computed.append(statistics.fmean(stats.per_layer_computed_fraction))
        row = Row(variant, batch, statistics.median(steps) * 1e3, statistics.fmean(active),
                  statistics.fmean(computed))
        row.floor_ms = floor_ms(ctx, batch, row.computed if sparse else 1.0, with_predictor=sparse,
                                predictor_bytes=1 if variant == "sparse-int8pred" else 0)
        if variant == "sparse" and engine.runner.decode_graphs is not None:
            row.note = "graphs" if engine.runner.decode_graphs.capture else "buckets, no capture (CPU)"
        ctx.rows.append(row)
        logger.info("%s batch %d: %.2f ms/step, %.0f tok/s (floor %.2f ms)", variant, batch, row.step_ms,
                    row.tok_s, row.floor_ms)
    del engine


def _request(request_id: str, ids: list[int], params: SamplingParams):
    from sparse_serve.engine.core.input_processor import EngineRequest
    return EngineRequest(request_id=request_id, prompt_token_ids=ids, params=params)


@torch.no_grad()
def run_transformers(ctx: Context) -> None:
    """MistralForCausalLM with our dense weights; generate with a static cache (compiled on a GPU)."""
    from transformers import GenerationConfig, MistralConfig, MistralForCausalLM

    arch, args = ctx.arch, ctx.args
    cfg = MistralConfig(vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                        intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_layers,
                        num_attention_heads=arch.num_heads, num_key_value_heads=arch.num_kv_heads,
                        max_position_embeddings=args.prompt_len + args.gen_len + 16, rms_norm_eps=1e-5,
                        rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False)
    with torch.device("meta"):
        hf = MistralForCausalLM(cfg).to(ctx.dtype)
    hf.to_empty(device=ctx.device)
    ours = ctx.model
    hf.model.embed_tokens.weight.copy_(ours.model.embed_tokens.weight)
    hf.model.norm.weight.copy_(ours.model.norm.weight)
    hf.lm_head.weight.copy_(ours.lm_head.weight)
    for theirs, mine in zip(hf.model.layers, ours.model.layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(theirs.self_attn, name).weight.copy_(getattr(mine.self_attn, name).weight)
        theirs.mlp.gate_proj.weight.copy_(mine.mlp.gate_proj.weight)
        theirs.mlp.up_proj.weight.copy_(mine.mlp.up_proj.weight)
        theirs.mlp.down_proj.weight.copy_(mine.mlp.w_down_t.t())
        theirs.input_layernorm.weight.copy_(mine.input_layernorm.weight)
        theirs.post_attention_layernorm.weight.copy_(mine.post_attention_layernorm.weight)
    hf.eval()
    gen = torch.Generator().manual_seed(args.seed)

    def timed(ids, new_tokens: int) -> float:
        config = GenerationConfig(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  cache_implementation="static", eos_token_id=None, pad_token_id=0)
        sync(ctx.device)
        start = time.perf_counter()
        hf.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
        sync(ctx.device)
        return time.perf_counter() - start

    deadline = time.perf_counter() + args.transformers_budget_s
    for batch in args.batches:
        if time.perf_counter() > deadline:
            note = f"skipped: over the {args.transformers_budget_s:.0f} s budget"
            ctx.rows.append(Row("transformers", batch, note=note))
            continue
        ids = torch.randint(3, arch.vocab_size, (batch, args.prompt_len), generator=gen).to(ctx.device)
        timed(ids, args.gen_len)                                     # compiles for this batch size
        # decode time per token = (generate n tokens - generate 1) / (n - 1), best of 3 each
        full = min(timed(ids, args.gen_len) for _ in range(3))
        one = min(timed(ids, 1) for _ in range(3))
        row = Row("transformers", batch, (full - one) / (args.gen_len - 1) * 1e3)
        row.floor_ms = floor_ms(ctx, batch, 1.0, with_predictor=False)
        row.note = "static cache, compiled" if ctx.device.type == "cuda" else "static cache"
        if row.step_ms <= 0:   # a run too short to time on a busy host (the CPU smoke mode)
            row.step_ms, row.note = math.nan, row.note + "; too short to time"
        ctx.rows.append(row)
        logger.info("transformers batch %d: %.2f ms/step", batch, row.step_ms)


def table(ctx: Context) -> str:
    dense = {r.batch: r.step_ms for r in ctx.rows if r.variant == "dense"}
    lines = ["| variant | batch | decode ms/step | tok/s | byte floor ms | x floor | vs dense | active | computed "
             "| note |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in ctx.rows:
        vs = f"{dense[r.batch] / r.step_ms:.2f}x" if r.batch in dense else "—"   # no dense run of this batch
        # NOTE: 4 significant digits for the floor: the tiny smoke shape's is a few microseconds
        lines.append(f"| {r.variant} | {r.batch} | {r.step_ms:.2f} | {r.tok_s:.0f} | {r.floor_ms:.4g} | "
                     f"{r.step_ms / r.floor_ms:.2f} | {vs} | {r.active:.3f} | {r.computed:.3f} | {r.note} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mistral7b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--gen-len", type=int, default=256)
    parser.add_argument("--predicted", type=float, default=0.10, help="fraction of neurons predicted per token")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    # NOTE: 125 s (was 150) leaves sparse-int8pred room inside bench/gpu_e2e.sh's 270 s
    parser.add_argument("--transformers-budget-s", type=float, default=125.0,
                        help="batch sizes of the transformers baseline started after this are skipped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quantization", choices=QUANTIZATION_METHODS,
                        help="CPU only: serve the model as `--quantization` does (weights int8 or 4-bit rows, "
                             "built from the random --dtype weights in place; activations on the method's "
                             "grid, KV cache float32); the sparse variant only")
    parser.add_argument("--out", help="write the markdown table here")
    args = parser.parse_args(argv)
    if args.quantization and (args.device != "cpu" or set(args.variants) != {"sparse"}):
        parser.error("--quantization runs on --device cpu with --variants sparse only (int8 has no "
                     "dense BLAS path to compare, and no GPU kernels)")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    arch = shape_arch(SHAPES[args.shape], args.prompt_len + args.gen_len + 16)
    started = time.perf_counter()
    model = random_model(arch, device, dtype, args.seed)
    calibrate_predictors(model, args.predicted, args.prompt_len, args.seed)
    weight_bytes = head_bytes = 0
    if args.quantization:
        quantize_for_serving(model, args.quantization)
        dtype, head_bytes = torch.float32, HEAD_WEIGHT_BITS / 8
        weight_bytes = GROUP_BYTES / GROUP if WEIGHT_BITS[args.quantization] == 4 else 1
    tokenizer_dir = tempfile.TemporaryDirectory(prefix="gpu_e2e_tokenizer_")
    ctx = Context(args, device, dtype, arch, model, numbered_tokenizer(arch.vocab_size, tokenizer_dir.name),
                  weight_bytes=weight_bytes, head_bytes=head_bytes)
    ctx.bandwidth = copy_bandwidth(device)
    logger.info("model built and calibrated in %.1f s; copy bandwidth %.0f GB/s",
                time.perf_counter() - started, ctx.bandwidth / 1e9)
    for variant in args.variants:
        if variant == "transformers":
            for layer in model.model.layers:
                layer.self_attn.kv_cache = None
            run_transformers(ctx)
        elif variant == "sparse-int8pred":
            with int8_predictors(model):
                run_engine(ctx, variant)
        else:
            run_engine(ctx, variant)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    report = (f"# Served decode at {args.shape} shape ({name}, {args.dtype})\n\n"
              f"{datetime.date.today()}, `python bench/gpu_e2e.py {' '.join(argv or sys.argv[1:])}`; "
              f"prompt {args.prompt_len}, generated {args.gen_len}, predicted {args.predicted:.0%} per token; "
              f"copy bandwidth {ctx.bandwidth / 1e9:.0f} GB/s.\n\n{table(ctx)}\n")
    print(report)
    if args.out:
        with open(args.out, "w") as f:
            f.write(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
