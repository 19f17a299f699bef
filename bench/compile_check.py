"""Compile every Triton kernel launch for a GPU target, on a machine without a GPU.

Runs each launcher (sparse FFN in both modes, from the mask alone and from the predictor's
group counts, with the reduction fused and not; the predictor, counting groups and not, and with
int8 weights; paged attention) on CPU tensors of the real shapes with the kernel launches recorded instead of run,
then compiles each recorded launch for the target with Triton's own compiler and bundled ptxas
(specialised as a launch would be), and reads the compiled kernel's resources back (ptxas -v).
What it catches before any device time is spent: code the interpreter accepts but the compiler
does not, shared memory over the SM's limit (a launch would fail with OutOfResources), and
register spills (local-memory traffic in a bandwidth-bound kernel).

    python bench/compile_check.py                 # sm_90 (H100/H200): table, exit 1 on a failure
    python bench/compile_check.py --arch 90 89    # and sm_89 (L4, L40S, RTX 4090: 99 KiB)

A failure: a launch that does not compile, or needs more shared memory than the target has.
Register spills are reported, for a human to weigh: float32 weights
on a GPU are a correctness path, and a few bytes of spill need not make a slow kernel. Batches of
4-8 rows compile the same tl.dot tiles (rows pad to 16), so rows 1, 2 and 4 cover the decode
kernels.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

# NOTE: triton.jit reads this when the kernels' modules are imported: compiled kernels, not the
# interpreter (the tests' conftest turns the interpreter on; run this in its own process).
os.environ["TRITON_INTERPRET"] = "0"

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.compiler import ASTSource

from sparse_serve.kernels import (
    ffn_triton_compact,
    paged_attention_triton,
    predictor_triton,
    sparse_ffn_triton,
)
from sparse_serve.kernels.ffn_triton_compact import default_config
from sparse_serve.kernels.sparse_ffn_ref import prediction_groups
from sparse_serve.kernels.triton_utils import DOT_MIN_ROWS

# Shared memory one block may use, per target (opt-in maximum).
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
# SMs of the card the tiles are tuned on (an H100 SXM): the grids are recorded for it, whatever
# the target architecture (launches are recorded once)
H100_SMS = 132
TORCH_TO_TRITON = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
                   torch.int8: "i8", torch.int32: "i32", torch.int64: "i64", torch.bool: "i1"}
HIDDEN, INTERMEDIATE = 4096, 14336          # Mistral-7B FFN
LAUNCHERS = [(ffn_triton_compact, "_compact_kernel _gate_up_kernel _gate_up_counted_kernel "
                                  "_gate_pass_kernel "
                                  "_down_kernel _reduce_kernel"),
             (sparse_ffn_triton, "_gate_up_kernel _down_kernel"),
             (predictor_triton, "_linear_epilogue_kernel"),
             (paged_attention_triton,
              "_paged_attention_decode_kernel _paged_attention_reduce_kernel")]


@dataclass
class Launch:
    case: str
    module: str          # where the kernel is defined, so that a worker process can find it
    name: str
    args: tuple
    meta: dict


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **meta)` records the launch."""

    def __init__(self, module, name: str, sink: list, case: list):
        self.module, self.name, self.sink, self.case = module.__name__, name, sink, case

    def __getitem__(self, grid):
        def launch(*args, **meta):
            self.sink.append(Launch(self.case[0], self.module, self.name, args, meta))
        return launch


@contextlib.contextmanager
def recording(sink: list, case: list):
    saved = []
    for module, names in LAUNCHERS:
        for name in names.split():
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, _Recorder(module, name, sink, case))
    for module, _ in LAUNCHERS:
        if hasattr(module, "check_device"):   # the launchers take CPU tensors here
            saved.append((module, "check_device", module.check_device))
            module.check_device = lambda *tensors: None
    # the grids a GPU gets (CPU tensors count one SM): the counted gate/up kernel's share of the
    # layer to clear (CLEAR) follows its programs, and so do its registers
    saved.append((ffn_triton_compact, "_num_sms", ffn_triton_compact._num_sms))
    ffn_triton_compact._num_sms = lambda device: H100_SMS
    try:
        yield
    finally:
        for module, name, value in saved:
            setattr(module, name, value)


def record_cases(dtypes: list[torch.dtype]) -> list[Launch]:
    """Every launch of the shipped paths (and the tuner's variants) at Mistral-7B shape."""
    launches: list[Launch] = []
    case = [""]
    zeros = torch.zeros
    with recording(launches, case):
        for dtype in dtypes:
            name = TORCH_TO_TRITON[dtype]
            w = zeros(INTERMEDIATE, HIDDEN, dtype=dtype)
            fc1, fc2 = zeros(1024, HIDDEN, dtype=dtype), zeros(INTERMEDIATE, 1024, dtype=dtype)
            fc1_q, fc2_q = zeros(1024, HIDDEN, dtype=torch.int8), zeros(INTERMEDIATE, 1024, dtype=torch.int8)
            for T in (1, 2, 4):
                x = zeros(T, HIDDEN, dtype=dtype)
                mask = zeros(T, INTERMEDIATE, dtype=torch.bool)
                case[0] = f"ffn predicted {name} T={T}"
                sparse_ffn_triton.sparse_ffn_triton(x, w, w, w, "silu", 0.0, mask)
                masked = " (masked kernels)" if T >= DOT_MIN_ROWS else ""
                case[0] = f"ffn exact {name} T={T}{masked}"
                sparse_ffn_triton.sparse_ffn_triton(x, w, w, w, "fatrelu", 0.1)
                counts = zeros(prediction_groups(INTERMEDIATE)[1], dtype=torch.int32)
                case[0] = f"ffn predicted {name} T={T}, the predictor's group counts"
                sparse_ffn_triton.sparse_ffn_triton(x, w, w, w, "silu", 0.0, mask,
                                                    predicted_group_counts=counts)
                case[0] = f"predictor {name} T={T}"
                predictor_triton.predict_active_triton(x, fc1, fc2)
                case[0] = f"predictor {name} T={T}, counting groups"
                predictor_triton.predict_active_triton(x, fc1, fc2, group_counts=counts)
                if dtype != torch.float32:   # int8 predictor copies (gpu_e2e's sparse-int8pred)
                    case[0] = f"predictor int8 weights, {name} activations T={T}, counting groups"
                    predictor_triton.predict_active_triton(
                        x, fc1_q, fc2_q, group_counts=counts,
                        scales=(zeros(1024, dtype=torch.float32), zeros(INTERMEDIATE, dtype=torch.float32)))
                # the reduction the tuned tiles do not use (fused or a launch of its own)
                variant = dict(down_fused_reduce=not default_config(T).down_fused_reduce)
                case[0] = f"ffn predicted {name} T={T} {variant}"
                config = dataclasses.replace(default_config(T), **variant)
                sparse_ffn_triton.sparse_ffn_triton(x, w, w, w, "drelu", 0.0, mask,
                                                    compact_config=config)
            # Mistral attention: 32 query heads over 8 KV heads, head dim 128; a context that
            # fits one partition (one kernel) and one split over several (partials + reduce)
            for S, context in ((1, 128), (8, 128), (8, 4096)):
                case[0] = f"paged attention {name} S={S} context {context}"
                cache = zeros(64, 16, 8, 128, dtype=dtype)
                paged_attention_triton.paged_attention_decode_triton(
                    zeros(S, 32, 128, dtype=dtype), cache, cache,
                    zeros(S, context // 16, dtype=torch.int32), torch.ones(S, dtype=torch.int32),
                    0.088, sliding_window=4096)
    return launches


def compile_job(launch: Launch, arch: int) -> tuple:
    """What compiling a launch takes, as plain (picklable) values; equal jobs compile once.

    Specialised as Triton's JIT does at a launch: an int equal to 1 becomes a constant, and
    ints divisible by 16 and 16-byte-aligned pointers are marked so (what lets it vectorise
    loads).
    """
    kernel = getattr(importlib.import_module(launch.module), launch.name)
    meta = dict(launch.meta)
    options = {k: meta.pop(k) for k in ("num_warps", "num_stages") if k in meta}
    signature, constants, aligned = {}, dict(meta), []
    for i, (name, value) in enumerate(zip(kernel.arg_names, launch.args)):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + TORCH_TO_TRITON[value.dtype]
            if value.data_ptr() % 16 == 0:
                aligned.append(i)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int) and value == 1:
            signature[name] = "constexpr"
            constants[name] = 1
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                aligned.append(i)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{launch.name}: argument {name} is a {type(value)}")
    signature.update({name: "constexpr" for name in meta})
    return (arch, launch.module, launch.name, tuple(signature.items()), tuple(constants.items()),
            tuple(options.items()), tuple(aligned))


def _resources(ptx: str, arch: int) -> dict:
    """Registers and spill stores per thread: what ptxas -v says of the kernel's PTX, assembled
    by the ptxas Triton uses for `arch`, with the register-allocation flag Triton passes."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        done = subprocess.run([get_ptxas(arch).path, "-v", "--regAllocOptLevel=2",
                               f"--gpu-name={sm_arch_from_capability(arch)}", str(src),
                               "-o", str(Path(tmp) / "kernel.cubin")],
                              capture_output=True, text=True, check=True)
    log = done.stdout + done.stderr
    regs = re.search(r"Used (\d+) registers", log)
    return dict(regs=int(regs.group(1)) if regs else 0,
                spill=sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", log)))


def compile_kernel(job: tuple) -> dict:
    """Compile one job (in a worker process); its resources, or the error it raised."""
    arch, module, name, signature, constexprs, options, aligned = job
    kernel = getattr(importlib.import_module(module), name)
    attrs = {(i,): [["tt.divisibility", 16]] for i in aligned}
    try:
        compiled = triton.compile(ASTSource(fn=kernel, signature=dict(signature),
                                            constexprs=dict(constexprs), attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32), options=dict(options))
    except Exception as exc:  # noqa: BLE001 - reported by the caller as a failure
        return dict(error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return dict(_resources(compiled.asm["ptx"], arch), shared=compiled.metadata.shared)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[90], choices=sorted(SHARED_LIMIT))
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"],
                        choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    lines: list[str] = []

    def emit(line: str = "") -> None:
        print(line)
        lines.append(line)

    dtypes = [{"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[d]
              for d in args.dtypes]
    launches = record_cases(dtypes)
    jobs = {arch: [compile_job(launch, arch) for launch in launches] for arch in args.arch}
    # NOTE: compiling is single-threaded and takes ~1 s a kernel: one process per core. Spawned,
    # not forked: the workers import the kernels afresh (TRITON_INTERPRET=0, no recorders).
    unique = sorted({job for arch_jobs in jobs.values() for job in arch_jobs}, key=str)
    workers = min(len(unique), os.cpu_count() or 1)
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        compiled = dict(zip(unique, pool.map(compile_kernel, unique)))
    emit(f"triton {triton.__version__}, {len(unique)} distinct kernels compiled")
    failures = []
    for arch in args.arch:
        limit = SHARED_LIMIT[arch]
        emit(f"\n## sm_{arch} (shared memory limit {limit} bytes)\n")
        emit("| case | kernel | warps | regs | spill stores (bytes) | shared bytes |")
        emit("|---|---|---|---|---|---|")
        for launch, job in zip(launches, jobs[arch]):
            r = compiled[job]
            if "error" in r:
                failures.append(f"sm_{arch} {launch.case} {launch.name}: does not compile: "
                                f"{r['error']}")
                continue
            emit(f"| {launch.case} | {launch.name} | {dict(job[5]).get('num_warps', 4)} "
                  f"| {r['regs']} | {r['spill']} | {r['shared']} |")
            if r["shared"] > limit:
                failures.append(f"sm_{arch} {launch.case} {launch.name}: "
                                f"{r['shared']} bytes of shared memory > {limit}")
    for failure in failures:
        emit(f"FAILED: {failure}")
    if args.out is not None:
        header = ["# Triton kernels compiled without a GPU", "",
                  f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
                  f"- Command: `python bench/compile_check.py {' '.join(sys.argv[1:])}`",
                  "- Mistral-7B shapes (FFN 4096 x 14336, predictor rank 1024, attention 32 / 8 "
                  "heads of 128); `spill stores` as ptxas -v reports them.", ""]
        args.out.write_text("\n".join(header + lines) + "\n")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
