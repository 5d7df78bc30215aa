"""Throughput of the hf engine by batch size, on the tiny model, fixed-length generation.

    python bench/infer_bench.py [--items 32] [--new-tokens 32] [--batch-sizes 1 4 16]

Every request generates exactly --new-tokens tokens (end-of-turn suppressed until then), so the
batch sizes do the same work. Prints samples/s and generated tokens/s per batch size, and the
ratio against batch size 1 measured in the same run; exits 1 if batching does not beat it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from data_prep.synthetic import generate as make_synthetic
from infer import qwen_omni as qo
from infer.data import load_items
from infer.engine import Request, SamplingConfig, load_engine
from infer.recipe import load_recipe
from infer.tiny import build_tiny_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings per batch size")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="infer-bench-"))
    checkpoint = build_tiny_checkpoint(work / "tiny-omni")
    make_synthetic(work / "synthetic", train=0, test=args.items, seed=0)
    recipe = load_recipe("recipes/tiny.yaml", [f"model.path={checkpoint}", "infer.adapter=null"])
    engine = load_engine(recipe, device="cpu")
    items = load_items(work / "synthetic" / "test.jsonl")
    requests = [Request(i.id, qo.render_prompt(engine.tokenizer, i.question, i.choices), i.load_audio()) for i in items]
    sampling = SamplingConfig.greedy(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens)
    print(f"tiny thinker, {len(requests)} requests with 1-3 s audio, {args.new_tokens} new tokens each, "
          f"greedy, float32, {torch.get_num_threads()} CPU threads")

    rates = {}
    for batch_size in args.batch_sizes:
        engine.batch_size = batch_size
        engine.generate(requests[:batch_size], sampling)  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            start = time.perf_counter()
            outs = engine.generate(requests, sampling)
            best = min(best, time.perf_counter() - start)
        tokens = sum(g.n_generated_tokens for g in outs)
        assert tokens == len(requests) * args.new_tokens
        rates[batch_size] = len(requests) / best
        print(f"batch {batch_size:>3}: {rates[batch_size]:7.2f} samples/s  {tokens / best:8.1f} generated tok/s  "
              f"({best:.2f} s)  x{rates[batch_size] / rates[args.batch_sizes[0]]:.2f} vs batch {args.batch_sizes[0]}")
    best_batched = max(rate for size, rate in rates.items() if size > 1)
    ratio = best_batched / rates[1] if 1 in rates else float("nan")
    print(f"batched / one-by-one: x{ratio:.2f}")
    return 0 if ratio > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
