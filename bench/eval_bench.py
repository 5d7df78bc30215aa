"""Scoring speed on the real benchmark: 1,000 items, synthetic predictions, a warm judge cache.

    python -m bench.eval_bench [--meta data/mmar/MMAR-meta.jsonl]   (the official file: docs/eval.md)

Baseline in the same run: Accuracy-only scoring (judge backend `none`). The cache is filled first
by an instant in-process judge (so "cold" measures our overhead, not an API's latency); then the
warm run must make zero calls. Also timed: the same warm run in a fresh process (imports included).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import write_json
from core.recipe import load_recipe
from eval.score import score

REPO = Path(__file__).resolve().parents[1]


class InstantJudge:
    identity, max_workers = "bench-judge", 8

    def complete(self, system: str, user: str) -> str:
        n = user.count("### Criterion: ")
        return json.dumps([{"name": "c", "score": i % 2, "justification": "j"} for i in range(n)])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--meta", default=str(REPO / "data" / "mmar" / "MMAR-meta.jsonl"),
                   help="the official MMAR-meta.jsonl (default: data/mmar/, where docs/eval.md says to put it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--warm-only", help=argparse.SUPPRESS)  # the fresh-process leg: JSON list of overrides
    args = p.parse_args()
    if args.warm_only:
        report = score(load_recipe(None, json.loads(args.warm_only)), progress=False, backend=InstantJudge())
        assert report["judge"]["calls_made"] == 0
        return
    if not Path(args.meta).is_file():
        sys.exit(f"{args.meta}: file not found (the official MMAR-meta.jsonl: docs/eval.md says where to get it)")
    records = [json.loads(line) for line in Path(args.meta).read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sub = tmp / "sub.jsonl"
        with sub.open("w") as f:
            for r in records:  # ~70 % right, a few hundred words of "reasoning" each
                answer = r["answer"] if rng.random() < 0.7 else rng.choice(r["choices"])
                thinking = " ".join(rng.choice(r["thinking"].split() or ["x"]) for _ in range(300))
                f.write(json.dumps({"id": r["id"], "thinking_prediction": thinking, "answer_prediction": answer}) + "\n")
        common = [f"eval.meta={args.meta}", f"eval.submission={sub}", f"eval.judge.cache={tmp / 'cache.sqlite'}"]

        def timed(extra, backend=None):
            recipe = load_recipe(None, common + extra)
            start = time.perf_counter()
            report = score(recipe, progress=False, backend=backend)
            return time.perf_counter() - start, report

        timed([f"eval.report_dir={tmp / 'r0'}"])  # warm-up: first-use imports (matplotlib) are not timed
        base_s, _ = timed([f"eval.report_dir={tmp / 'r0'}"])
        cold_s, cold = timed([f"eval.report_dir={tmp / 'r1'}"], InstantJudge())
        warm_s, warm = timed([f"eval.report_dir={tmp / 'r2'}"], InstantJudge())
        assert warm["judge"]["calls_made"] == 0 and warm["judge"]["cached"] == cold["judge"]["calls_made"]
        assert warm["totals"] == cold["totals"]
        # A fresh process (interpreter start and imports included) on the warm cache.
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "bench.eval_bench", "--meta", args.meta,
                        "--warm-only", json.dumps(common + [f"eval.report_dir={tmp / 'r3'}"])], check=True, cwd=REPO)
        fresh_s = time.perf_counter() - start

    n = len(records)
    ratings = cold["judge"]["requested"]
    print(f"items: {n}; correct: {cold['totals']['correct']}; judge ratings: {ratings}")
    print(f"baseline (Accuracy only, no judge): {base_s:6.2f} s  {n / base_s:8.0f} items/s")
    print(f"cold cache (instant judge, {ratings} writes): {cold_s:6.2f} s  {n / cold_s:8.0f} items/s")
    print(f"warm cache (0 calls):                {warm_s:6.2f} s  {n / warm_s:8.0f} items/s  "
          f"({warm_s / base_s:.2f}x the baseline)")
    print(f"warm cache, fresh process incl. imports: {fresh_s:6.2f} s  {n / fresh_s:8.0f} items/s")
    write_json(args.json, {"items": n, "judge_ratings": ratings, "seconds": {
        "accuracy_only": base_s, "cold_cache": cold_s, "warm_cache": warm_s, "warm_cache_fresh_process": fresh_s}})


if __name__ == "__main__":
    main()
