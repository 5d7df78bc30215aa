"""GRPO from the tiny demo's SFT adapter: does the answer reward rise, does held-out accuracy beat the start?

    python -m bench.grpo_bench [--sft-adapter runs/tiny/adapter] [--steps 30] [--out runs/bench/grpo] [--json F]

1. GRPO (recipes/grpo_tiny.yaml) from the SFT adapter for `--steps` rollout steps; the answer reward
   (official rule) per window of steps, first vs last window.
2. Greedy answers of the SFT adapter and of the GRPO adapter on the held-out synthetic test set
   (`python -m infer run`), compared item by item (`eval compare`): accuracy of each, the paired
   difference with its 95% bootstrap interval and the exact McNemar p.
3. Rollout throughput: the same G x prompts rollouts generated one request at a time vs in one
   batch (`grpo.rollout_batch_size`), fixed length, tokens/s and the ratio.

The SFT adapter is trained first (`train/sft.py recipes/tiny.yaml`) when it is missing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import machine, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "grpo_tiny.yaml"


def run(*args: str) -> None:
    subprocess.run([sys.executable, *args], cwd=REPO, check=True)


def ensure_inputs(recipe: dict, sft_adapter: Path) -> None:
    if not (REPO / recipe["model"]["path"] / "config.json").is_file():
        run("-m", "core.tiny", recipe["model"]["path"])
    if not (REPO / recipe["infer"]["meta"]).is_file():
        run("-m", "data_prep.synthetic", str(Path(recipe["infer"]["meta"]).parent))
    if not (sft_adapter / "adapter_config.json").is_file():
        print(f"no SFT adapter at {sft_adapter}: training the demo's (train/sft.py recipes/tiny.yaml)", flush=True)
        run("train/sft.py", "recipes/tiny.yaml", f"train.output_dir={sft_adapter.parent}")


def windows(records: list[dict], size: int) -> list[dict]:
    rows = []
    for start in range(0, len(records), size):
        chunk = records[start:start + size]
        rows.append({
            "steps": f"{chunk[0]['step']}-{chunk[-1]['step']}",
            "answer reward": float(np.mean([m["reward/answer/mean"] for m in chunk])),
            "format reward": float(np.mean([m["reward/format/mean"] for m in chunk])),
            "total reward": float(np.mean([m["reward/total/mean"] for m in chunk])),
            "completion tokens": float(np.mean([m["completion_length"] for m in chunk])),
            "rollout tok/s": float(np.mean([m["rollout_tokens_per_s"] for m in chunk])),
        })
    return rows


def rollout_throughput(recipe_path: Path, sft_adapter: Path, prompts: int, tokens: int) -> dict:
    """Tokens/s of the same rollouts one request at a time and in one batch (fixed length: same work)."""
    from core import qwen_omni as qo
    from core.items import load_items
    from core.recipe import load_recipe
    from infer.engine import HFEngine, Request, SamplingConfig

    recipe = load_recipe(recipe_path, [f"grpo.init_adapter={sft_adapter}"])
    from train.grpo import load_policy

    model, _ = load_policy(recipe)
    processor = qo.OmniProcessor.from_pretrained(recipe.model.path)
    items = load_items(recipe.grpo.stages[0].data[0].path)[:prompts]
    group = recipe.grpo.num_generations
    requests = [Request(f"{it.id}#{g}", qo.render_prompt(processor.tokenizer, it.question, it.choices), it.load_audio(30))
                for it in items for g in range(group)]
    sampling = SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=1.0)
    out = {}
    for name, batch in (("one at a time", 1), ("batched", recipe.grpo.rollout_batch_size)):
        engine = HFEngine(model, processor, sampling, batch, "cpu")
        engine.generate(requests[:batch], sampling)  # warm-up
        start = time.perf_counter()
        generations = engine.generate(requests, sampling)
        seconds = time.perf_counter() - start
        out[name] = {"batch": batch, "sequences": len(requests), "tokens": sum(g.n_generated_tokens for g in generations),
                     "seconds": seconds}
        out[name]["tokens_per_s"] = out[name]["tokens"] / seconds
    out["speedup"] = out["batched"]["tokens_per_s"] / out["one at a time"]["tokens_per_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-adapter", default="runs/tiny/adapter")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--window", type=int, default=10, help="steps per row of the reward table")
    parser.add_argument("--out", default="runs/bench/grpo")
    parser.add_argument("--throughput-prompts", type=int, default=4)
    parser.add_argument("--throughput-tokens", type=int, default=64)
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the tiny model: a second thread only adds spin-waits on a shared machine

    from eval.compare import compare

    out, sft_adapter = REPO / args.out, REPO / args.sft_adapter
    recipe = yaml.safe_load(RECIPE.read_text())
    ensure_inputs(recipe, sft_adapter)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    recipe["grpo"]["init_adapter"] = str(sft_adapter)
    recipe["grpo"]["stages"][0]["steps"] = args.steps
    recipe["train"]["output_dir"] = str(out / "grpo")
    recipe_path = out / "grpo_recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    info = machine()
    print(f"machine: {info}", flush=True)

    start = time.perf_counter()
    run("train/grpo.py", str(recipe_path))
    train_seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    rows = windows(records, args.window)
    print_table(rows, f"GRPO from the SFT adapter ({args.steps} steps, {train_seconds:.0f} s): rewards by window of steps")

    submissions = {}
    for name, adapter in (("sft", sft_adapter), ("grpo", out / "grpo" / "adapter")):
        submissions[name] = out / name / "submission.jsonl"
        run("-m", "infer", "run", str(recipe_path), f"infer.adapter={adapter}", f"infer.output={submissions[name]}")
    paired = compare(submissions["sft"], submissions["grpo"], recipe["infer"]["meta"])
    lo, hi = paired["accuracy_delta_ci"]
    held_out = [{
        "items": paired["items"], "SFT accuracy %": paired["accuracy_a"], "GRPO accuracy %": paired["accuracy_b"],
        "GRPO - SFT (pts)": paired["accuracy_delta"], "95% paired CI": f"{lo:+.1f} to {hi:+.1f}",
        "SFT only right": paired["a_only_correct"], "GRPO only right": paired["b_only_correct"],
        "McNemar p": paired["mcnemar_p"],
    }]
    print_table(held_out, "Held-out synthetic test set, greedy: SFT start (A) vs after GRPO (B), eval compare")

    throughput = rollout_throughput(recipe_path, sft_adapter, args.throughput_prompts, args.throughput_tokens)
    print_table([{"rollouts": name, **{k: v for k, v in row.items()}} for name, row in throughput.items() if name != "speedup"],
                f"Rollout throughput (G={recipe['grpo']['num_generations']} x {args.throughput_prompts} prompts, "
                f"{args.throughput_tokens} tokens each): batched {throughput['speedup']:.2f}x one at a time")
    first, last = rows[0]["answer reward"], rows[-1]["answer reward"]
    print(f"answer reward: first window {first:.3f} -> last window {last:.3f}; "
          f"held-out accuracy {paired['accuracy_a']:.1f} -> {paired['accuracy_b']:.1f} (B-A {paired['accuracy_delta']:+.1f}, "
          f"95% CI {lo:+.1f} to {hi:+.1f}, McNemar p={paired['mcnemar_p']:.3g})")
    write_json(args.json, {"machine": info, "steps": args.steps, "train_seconds": train_seconds, "reward_windows": rows,
                           "metrics": records, "held_out": paired, "rollout_throughput": throughput})
    return 0


if __name__ == "__main__":
    sys.exit(main())
