"""Prefix-cache keys: what an engine step pays for SHA-256 against Python's built-in hash().

The block manager keys each full KV block by a chain over (parent key, block token ids). A
client can collide Python's 64-bit `hash()` on purpose, so the keys are SHA-256 digests
(engine/core/block_manager.py). With blocks of 16 tokens this times, in microseconds:
- chain: hashing the blocks of a 512 / 4096-token prompt, nothing else;
- commit: `commit_computed` after a prompt's prefill (hash and register every full block);
- match: `match_prefix` of a prompt whose blocks are all cached (hash, look up, take each);
- decode: one step in which each of 1 / 16 / 64 running sequences fills a block and commits
  it (the worst step: with blocks of 16 a sequence crosses a block boundary every 16 tokens),
  and a step in which none does (what the other 15 steps in 16 pay).
"hash()" is a local copy of the previous keys, hash((parent, tokens)), with the block manager's
bookkeeping unchanged; it hashes each key once where the previous code hashed it twice (dict
lookup, then the chain), so "extra" overstates SHA-256's cost a little. Minimum (median) over
repeats, garbage collector off while timing. `--out` keeps a "## Notes" section of the file.

    .venv/bin/python -P bench/prefix_hash.py --out docs/benchmarks/prefix_hash.md
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import random
import ssl
import statistics
import sys
import time
from pathlib import Path

from sparse_serve.engine.core.block_manager import ROOT_HASH, BlockManager, block_hash
from sparse_serve.engine.core.sampling_params import SamplingParams
from sparse_serve.engine.core.sequence import Sequence

BLOCK = 16
VOCAB = 49152             # SmolLM2's
STEP_MS = 10.0            # the fast end of a SmolLM2 decode step on this 2-core CPU (10-50 ms)


class OldHashBlockManager(BlockManager):
    """The previous scheme: a block's key is Python's hash of (parent key, block tokens)."""

    def _block_hash(self, parent, seq, i):
        bs = self.block_size
        return hash((parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))


def old_chain(tokens: list[int]) -> None:
    parent = None
    for i in range(len(tokens) // BLOCK):
        parent = hash((parent, tuple(tokens[i * BLOCK:(i + 1) * BLOCK])))


def sha_chain(tokens: list[int]) -> None:
    parent = ROOT_HASH
    for i in range(len(tokens) // BLOCK):
        parent = block_hash(parent, tokens[i * BLOCK:(i + 1) * BLOCK])


def timed_us(setup, run, repeats: int) -> dict[type, tuple[float, float]]:
    """{manager class: (min, median) microseconds of `run(setup(cls))`}; setup is not timed and
    the schemes take turns (alternating which goes first), so a burst of load hits both."""
    times: dict[type, list[float]] = {OldHashBlockManager: [], BlockManager: []}
    order = list(times)
    for _ in range(repeats):
        order.reverse()
        for cls in order:
            state = setup(cls)
            gc.disable()
            start = time.perf_counter_ns()
            run(state)
            times[cls].append((time.perf_counter_ns() - start) / 1e3)
            gc.enable()
    return {cls: (min(out), statistics.median(out)) for cls, out in times.items()}


def make_seq(rng: random.Random, num_tokens: int) -> Sequence:
    return Sequence("bench", 0, [rng.randrange(VOCAB) for _ in range(num_tokens)], SamplingParams())


def cases(rng: random.Random, prompts: list[int], seqs: list[int]):
    """(name, blocks hashed, setup(manager class) -> state, run(state)) of every row."""
    for n in prompts:
        tokens = make_seq(rng, n).token_ids
        yield (f"chain, {n}-token prompt", n // BLOCK, lambda cls, t=tokens: (cls, t),
               lambda st: (old_chain if st[0] is OldHashBlockManager else sha_chain)(st[1]))
    for n in prompts:
        def setup(cls, n=n):
            bm, seq = cls(n // BLOCK + 1, BLOCK), make_seq(rng, n)
            bm.allocate(seq, n)
            seq.num_computed_tokens = n
            return bm, seq
        yield (f"commit, {n}-token prefill", n // BLOCK, setup,
               lambda st: st[0].commit_computed(st[1]))
    for n in prompts:
        def setup(cls, n=n):
            bm, seq = cls(2 * (n // BLOCK + 1), BLOCK), make_seq(rng, n + 1)
            bm.allocate(seq, n + 1)
            seq.num_computed_tokens = n + 1
            bm.commit_computed(seq)
            return bm, Sequence("hit", 0, seq.token_ids, SamplingParams())
        yield (f"match, {n}-token prompt all cached", n // BLOCK, setup,
               lambda st: st[0].match_prefix(st[1]))
    for s in seqs:
        for fills in (True, False):
            def setup(cls, s=s, fills=fills):
                ctx = prompts[0]        # a prompt already committed, then a block of output
                bm = cls(s * (ctx // BLOCK + 1), BLOCK)
                batch = [make_seq(rng, ctx + BLOCK) for _ in range(s)]
                for seq in batch:
                    bm.allocate(seq, ctx + BLOCK)
                    seq.num_computed_tokens = ctx
                    bm.commit_computed(seq)
                    seq.num_computed_tokens = ctx + BLOCK - (0 if fills else 1)
                return bm, batch

            def run(st):
                bm, batch = st
                for seq in batch:
                    bm.commit_computed(seq)
            if fills or s == seqs[-1]:
                what = "each fills a block" if fills else "no block fills"
                yield f"decode step, {s} seq{'s' * (s > 1)}, {what}", s if fills else 0, setup, run


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                  if line.startswith("model name")), platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines()
                  if line.startswith("flags")), [])
    vm = ", virtual machine" if "hypervisor" in flags else ""
    gpu = "an NVIDIA GPU (unused)" if Path("/dev/nvidia0").exists() else "no GPU"
    sha_ni = "yes" if "sha_ni" in flags else "no"
    return (f"{model}, {os.cpu_count()} logical CPUs{vm}, {gpu}; SHA extensions (sha_ni): "
            f"{sha_ni}; Python {platform.python_version()}, {ssl.OPENSSL_VERSION}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", nargs="+", type=int, default=[512, 4096])
    parser.add_argument("--seqs", nargs="+", type=int, default=[1, 16, 64])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    rows = ["| operation | blocks hashed | hash() us | SHA-256 us | extra us | extra per block us "
            f"| extra / {STEP_MS:g} ms step |", "|---|---|---|---|---|---|---|"]
    for name, blocks, setup, run in cases(random.Random(0), args.prompts, args.seqs):
        result = timed_us(setup, run, args.repeats)
        old, new = result[OldHashBlockManager], result[BlockManager]
        extra = new[0] - old[0]
        per_block = f"{extra / blocks:.2f}" if blocks else "-"
        rows.append(f"| {name} | {blocks} | {old[0]:.1f} ({old[1]:.1f}) "
                    f"| {new[0]:.1f} ({new[1]:.1f}) | {extra:.1f} | {per_block} "
                    f"| {extra / (STEP_MS * 1e3):.3%} |")
        print(rows[-1], flush=True)
    load_after = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    lines = ["# Prefix-cache keys: SHA-256 against Python's hash()", "",
             f"- Machine: {machine()}",
             f"- Date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
             f"- Command: `.venv/bin/python -P bench/prefix_hash.py {' '.join(sys.argv[1:])}`",
             f"- Blocks of {BLOCK} tokens, random token ids below {VOCAB}; microseconds, minimum "
             f"(median) over {args.repeats} repeats, setup untimed; extra = SHA-256 minus hash() "
             "minimums.",
             f"- Load average (1, 5, 15 min) before -> after: {load_before} -> {load_after} "
             "(a shared machine: compare rows of this one run only).",
             "- Context, not measured here: a SmolLM2-135M decode step on this CPU takes about "
             f"10-50 ms; the last column divides by {STEP_MS:g} ms, the fast end. A prefill of 512 "
             "or 4096 tokens takes far longer than a decode step, so for the chain, commit and "
             "match rows it is an upper bound.",
             ""] + rows
    print("\n".join(lines))
    if args.out is not None:
        previous = args.out.read_text() if args.out.exists() else ""
        notes = previous[previous.index("\n## Notes"):] if "\n## Notes" in previous else ""
        args.out.write_text("\n".join(lines) + "\n" + notes)


if __name__ == "__main__":
    main()
