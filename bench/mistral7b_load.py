"""The loader at TurboSparse-Mistral-7B size: write a checkpoint of that exact layout (random
bf16; 32 layers, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 32064, a rank-1024
predictor per layer, four shards + index) one tensor at a time into a temporary folder, load it
with our loader under the turbosparse-mistral family check, and report peak RSS and load time.

    .venv/bin/python -P -m sparse_serve.bench.mistral7b_load            # full size: ~15.7 GB on disk
    .venv/bin/python -P -m sparse_serve.bench.mistral7b_load --layers 4 # the memory plan at 4 layers

Not part of `make test`. Writer and loader each run in a child process, so each peak RSS is
its own (ru_maxrss of that child). The folder is always deleted, even on failure. Before
writing, it checks free disk; before loading, available memory (the plan: the model's bytes plus
its largest tensor).
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import resource
import shutil
import struct
import sys
import tempfile
import time
from pathlib import Path

import torch

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, RANK, LAYERS = 4096, 14336, 32, 8, 32064, 1024, 32
HEAD_DIM = HIDDEN // HEADS
NUM_SHARDS = 4
ELEMENT = 2   # bf16


def config_json(num_layers: int) -> dict:
    return {"architectures": ["BambooForCausalLM"], "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_bamboo.BambooConfig",
                         "AutoModelForCausalLM": "modeling_bamboo.BambooForCausalLM"},
            "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "relu", "hidden_size": HIDDEN,
            "initializer_range": 0.02, "intermediate_size": INTER, "max_position_embeddings": 32768,
            "model_type": "bamboo", "num_attention_heads": HEADS, "num_hidden_layers": num_layers,
            "num_key_value_heads": KV_HEADS, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
            "sliding_window": 4096, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.41.0", "use_cache": False, "vocab_size": VOCAB}


def tensor_specs(num_layers: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Groups of (name, shape): embeddings, one per layer, then the final norm and head."""
    groups = [[("model.embed_tokens.weight", (VOCAB, HIDDEN))]]
    for i in range(num_layers):
        p = f"model.layers.{i}"
        groups.append([(f"{p}.input_layernorm.weight", (HIDDEN,)),
                       (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
                       (f"{p}.self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
                       (f"{p}.self_attn.k_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
                       (f"{p}.self_attn.v_proj.weight", (KV_HEADS * HEAD_DIM, HIDDEN)),
                       (f"{p}.self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
                       (f"{p}.mlp.gate_proj.weight", (INTER, HIDDEN)),
                       (f"{p}.mlp.up_proj.weight", (INTER, HIDDEN)),
                       (f"{p}.mlp.down_proj.weight", (HIDDEN, INTER)),
                       (f"{p}.mlp.predictor.fc1.weight", (RANK, HIDDEN)),
                       (f"{p}.mlp.predictor.fc2.weight", (INTER, RANK))])
    groups.append([("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))])
    return groups


def total_bytes(num_layers: int) -> int:
    return sum(math.prod(s) * ELEMENT for g in tensor_specs(num_layers) for _, s in g)


def write_shard_streaming(path: Path, specs: list[tuple[str, tuple[int, ...]]], gen: torch.Generator) -> None:
    """A safetensors file written tensor by tensor: the header first (every shape is known),
    then each tensor generated and written on its own, so the writer holds one tensor at a time."""
    header, offset = {}, 0
    for name, shape in specs:
        size = math.prod(shape) * ELEMENT
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # NOTE: the format pads the header to 8-byte alignment
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in specs:
            if len(shape) == 1:
                tensor = torch.ones(shape, dtype=torch.bfloat16)
            else:
                tensor = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)
            f.write(tensor.view(torch.uint8).numpy())
            del tensor


def write_checkpoint(folder: Path, num_layers: int) -> dict:
    start = time.perf_counter()
    groups = tensor_specs(num_layers)
    shards = min(NUM_SHARDS, len(groups))
    bounds = [round(k * len(groups) / shards) for k in range(shards + 1)]
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for k in range(shards):
        name = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        specs = [spec for group in groups[bounds[k]:bounds[k + 1]] for spec in group]
        write_shard_streaming(folder / name, specs, gen)
        weight_map.update({n: name for n, _ in specs})
    index = {"metadata": {"total_size": total_bytes(num_layers)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(config_json(num_layers), indent=2))
    for name in ("modeling_bamboo.py", "configuration_bamboo.py"):
        (folder / name).write_text('raise RuntimeError("checkpoint code must never run")\n')
    return {"write_s": time.perf_counter() - start,
            "writer_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def load_checkpoint(folder: Path) -> dict:
    from sparse_serve.engine.checkpoints.loader import load_model
    from sparse_serve.engine.core.config import ModelConfig

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    model, arch = load_model(ModelConfig(path=str(folder), dtype="bfloat16", device="cpu",
                                         checkpoint_family="turbosparse-mistral"), folder)
    load_s = time.perf_counter() - start
    held = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    return {"load_s": load_s, "loader_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "rss_before_load_gib": base_rss, "model_bytes_gib": held / 2**30,
            "num_params_b": model.num_params() / 1e9, "predictor_ranks": sorted(set(arch.predictor_ranks))}


def in_child(fn, *args) -> dict:
    """Run fn in a fresh process (its own ru_maxrss) and return what it returned."""
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(fn, args)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=LAYERS, help="decoder layers (32 = full size)")
    parser.add_argument("--dir", default=None, help="parent of the temporary folder (default: $TMPDIR)")
    args = parser.parse_args(argv)
    need = total_bytes(args.layers)
    parent = Path(args.dir or tempfile.gettempdir())
    free = shutil.disk_usage(parent).free
    if free < need * 1.1:
        print(f"not enough disk in {parent}: need {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free; "
              "use --layers N to check the plan on fewer layers", file=sys.stderr)
        return 2
    largest = max(math.prod(s) * ELEMENT for g in tensor_specs(args.layers) for _, s in g)
    plan = need + largest   # NOTE: bf16 -> bf16 reads in place; the largest tensor bounds any temporary
    folder = Path(tempfile.mkdtemp(prefix="mistral7b-load-", dir=parent))
    try:
        written = in_child(write_checkpoint, folder, args.layers)
        if mem_available() < plan * 1.05:
            print(f"not enough memory to load: plan {plan / 2**30:.1f} GiB, available "
                  f"{mem_available() / 2**30:.1f} GiB", file=sys.stderr)
            return 2
        loaded = in_child(load_checkpoint, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    result = {"layers": args.layers, "checkpoint_gib": need / 2**30, "plan_gib": plan / 2**30,
              **written, **loaded}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
