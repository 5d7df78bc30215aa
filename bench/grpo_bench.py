"""GRPO from the tiny demo's SFT adapter: does the answer reward rise, does held-out accuracy beat the start?

    python -m bench.grpo_bench [--sft-adapter runs/tiny/adapter] [--steps N] [--window W] [--out runs/bench/grpo] [--json F]

1. GRPO (recipes/grpo_tiny.yaml) from the SFT adapter for `--steps` rollout steps (default: the recipe's);
   the answer reward (official rule) per window of steps (default: a quarter of the run), first vs last window.
2. Greedy answers of the SFT adapter and of the GRPO adapter on the held-out synthetic test set
   (`python -m infer run`), compared item by item (`eval compare`): accuracy of each, the paired
   difference with its 95% bootstrap interval and the exact McNemar p; accuracy per task beside it.
3. Rollout throughput: the same G x prompts rollouts generated one request at a time vs in one
   batch (`grpo.rollout_batch_size`), fixed length, tokens/s and the ratio.
4. Rollout engines (`--rollout-engines`, in .venv-vllm): the same G x prompts rollouts from the SFT
   policy through the hf engine (batched, as grpo.rollout_engine=hf) and through the vLLM engine GRPO
   colocates (grpo.rollout_engine=vllm: in this process, the policy's merged weights pushed, n=G),
   fixed length, in one run: tokens/s of each and the ratio vLLM/hf. `--only-rollout-engines` runs
   just this part.

The SFT adapter is trained first (`train/sft.py recipes/tiny.yaml`) when it is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from bench.common import machine, print_table, write_json
from core.outdir import check_replaceable, mark
from core.recipe import load_yaml

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "grpo_tiny.yaml"
MAKER = "bench.grpo_bench"


def run(*args: str) -> None:
    # one thread, as in this process: the tiny model's matmuls gain nothing from a second one on a shared machine
    subprocess.run([sys.executable, *args], cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


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


def reward_by_task(run_dir: Path, data_path: str, window: int, steps: int) -> list[dict]:
    """Mean answer reward of the rollouts per task (sub-category), first vs last window of steps: the
    step-level mean also moves with which tasks a step happens to draw; per task it does not."""
    task = {json.loads(line)["id"]: json.loads(line)["sub-category"]
            for line in (REPO / data_path).read_text().splitlines() if line.strip()}
    rollouts = [json.loads(line) for path in sorted((run_dir / "rollouts").glob("rank*.jsonl"))
                for line in path.read_text().splitlines()]
    spans = {"first": (1, window), "last": (steps - window + 1, steps)}
    rewards = {(name, t): [r["rewards"]["answer"] for r in rollouts
                           if lo <= r["step"] <= hi and task[r["id"].rsplit("#", 1)[0]] == t]
               for name, (lo, hi) in spans.items() for t in set(task.values())}
    rows = [{"task": t, **{f"steps {lo}-{hi}": float(np.mean(rewards[name, t])) if rewards[name, t] else float("nan")
                           for name, (lo, hi) in spans.items()}} for t in sorted(set(task.values()))]
    rows.append({"task": "mean over tasks", **{k: float(np.nanmean([row[k] for row in rows])) for k in rows[0] if k != "task"}})
    return rows


def by_task(submissions: dict[str, Path], meta_path: str) -> list[dict]:
    """Accuracy (%) of each side per task (the records' sub-category), official answer rule."""
    from eval.compare import load_side

    meta = [json.loads(line) for line in (REPO / meta_path).read_text().splitlines() if line.strip()]
    correct = {name: load_side(path, meta)[0] for name, path in submissions.items()}
    rows = []
    for task in sorted({r["sub-category"] for r in meta}) + ["all"]:
        ids = [r["id"] for r in meta if task in ("all", r["sub-category"])]
        rows.append({"task": task, "items": len(ids),
                     **{f"{name.upper()} %": 100 * float(np.mean([correct[name][i] for i in ids])) for name in submissions}})
    return rows


def rollout_throughput(recipe_path: Path, sft_adapter: Path, prompts: int, tokens: int) -> dict:
    """Tokens/s of the same rollouts one request at a time and in one batch (fixed length: same work)."""
    from core import qwen_omni as qo
    from core.items import load_items
    from core.recipe import load_recipe
    from infer.engine import HFEngine, Request, SamplingConfig

    recipe = load_recipe(recipe_path, [f"grpo.init_adapter={sft_adapter}"])
    from train.grpo import load_policy
    from train.runtime import load_processor

    model, _ = load_policy(recipe)
    processor = load_processor(recipe)
    items = load_items(recipe.grpo.stages[0].data[0].path)[:prompts]
    group = recipe.grpo.num_generations
    requests = [Request(f"{it.id}#{g}", qo.render_prompt(processor.tokenizer, it.question, it.choices), it.load_audio(30))
                for it in items for g in range(group)]
    sampling = SamplingConfig(max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=recipe.grpo.temperature)
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


def rollout_engines(recipe_path: Path, sft_adapter: Path, prompts: int, tokens: int) -> dict:
    """Tokens/s of the same rollouts through the hf engine and through GRPO's vLLM engine (fixed length), one run."""
    from core.items import load_items
    from core.recipe import load_recipe
    from infer.engine import Request
    from train.grpo import load_policy
    from train.rollouts import push_policy, rollout_engine, vllm_rollout_engine
    from train.runtime import load_processor

    recipe = load_recipe(recipe_path, [f"grpo.init_adapter={sft_adapter}", "grpo.vllm.kv_cache_gib=1",
                                       "grpo.vllm.enforce_eager=true", "grpo.vllm.max_model_len=2048"])
    model, _ = load_policy(recipe)
    processor = load_processor(recipe)
    items = load_items(recipe.grpo.stages[0].data[0].path)[:prompts]
    from core import qwen_omni as qo

    requests = [Request(it.id, qo.render_prompt(processor.tokenizer, it.question, it.choices), it.load_audio(30)) for it in items]
    group = recipe.grpo.num_generations
    hf = rollout_engine(model, processor, recipe, "cpu")
    vllm = vllm_rollout_engine(recipe, processor, 0, False)
    pushed, push_s = push_policy(vllm, model, torch.float32)
    sampling = hf.sampling.replace(max_new_tokens=tokens, min_new_tokens=tokens)
    out = {}
    for name, engine in (("hf", hf), ("vllm", vllm)):
        engine.generate_groups(requests[:1], group, sampling)  # warm-up
        start = time.perf_counter()
        generations = engine.generate_groups(requests, group, sampling)
        seconds = time.perf_counter() - start
        out[name] = {"sequences": len(generations), "tokens": sum(g.n_generated_tokens for g in generations),
                     "seconds": seconds, "distinct per group": min(len({generations[i + k].token_ids for k in range(group)})
                                                                  for i in range(0, len(generations), group))}
        out[name]["tokens_per_s"] = out[name]["tokens"] / seconds
    out["ratio vllm/hf"] = out["vllm"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    out["push"] = {"tensors": pushed, "seconds": push_s}
    return out


def print_rollout_engines(result: dict, group: int, prompts: int, tokens: int) -> None:
    print_table([{"engine": name, **result[name]} for name in ("hf", "vllm")],
                f"Rollout engines (G={group} x {prompts} prompts, {tokens} tokens each, the SFT policy; "
                f"vLLM after a push of {result['push']['tensors']} tensors in {result['push']['seconds']:.3f} s): "
                f"vLLM/hf {result['ratio vllm/hf']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sft-adapter", default="runs/tiny/adapter")
    parser.add_argument("--steps", type=int, help="rollout steps (default: the recipe's)")
    parser.add_argument("--window", type=int, help="steps per row of the reward table (default: a quarter of the steps)")
    parser.add_argument("--out", default="runs/bench/grpo")
    parser.add_argument("--throughput-prompts", type=int, default=8, help="prompts (x G completions): the recipe's step")
    parser.add_argument("--throughput-tokens", type=int, default=64)
    parser.add_argument("--rollout-engines", action="store_true", help="also hf vs vLLM rollouts (needs vllm: .venv-vllm)")
    parser.add_argument("--only-rollout-engines", action="store_true", help="only hf vs vLLM rollouts")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the tiny model: a second thread only adds spin-waits on a shared machine
    if args.only_rollout_engines:
        sft_adapter = REPO / args.sft_adapter
        recipe = yaml.safe_load(RECIPE.read_text())
        ensure_inputs(recipe, sft_adapter)
        print(f"machine: {machine()}; load average (1, 5, 15 min) {os.getloadavg()}", flush=True)
        result = rollout_engines(RECIPE, sft_adapter, args.throughput_prompts, args.throughput_tokens)
        print_rollout_engines(result, recipe["grpo"]["num_generations"], args.throughput_prompts, args.throughput_tokens)
        print(f"load average (1, 5, 15 min): {os.getloadavg()}")
        write_json(args.json, {"machine": machine(), "rollout_engines": result})
        return 0

    from eval.compare import compare

    out, sft_adapter = REPO / args.out, REPO / args.sft_adapter
    recipe = load_yaml(RECIPE.read_text(), str(RECIPE))
    ensure_inputs(recipe, sft_adapter)
    check_replaceable(out, MAKER)  # a fresh run each time, in a folder this script made
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    mark(out, MAKER)
    recipe["grpo"]["init_adapter"] = str(sft_adapter)
    steps = args.steps or recipe["grpo"]["stages"][0]["steps"]
    recipe["grpo"]["stages"][0]["steps"] = steps
    recipe["train"]["output_dir"] = str(out / "grpo")
    recipe_path = out / "grpo_recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    info = machine()
    print(f"machine: {info}; load average (1, 5, 15 min) {os.getloadavg()}", flush=True)
    load = {"start": os.getloadavg()}

    start = bench_start = time.perf_counter()
    run("train/grpo.py", str(recipe_path))
    train_seconds = time.perf_counter() - start
    records = [json.loads(line) for line in (out / "grpo" / "metrics.jsonl").read_text().splitlines()]
    window = args.window or max(1, steps // 4)
    rows = windows(records, window)
    print_table(rows, f"GRPO from the SFT adapter ({steps} steps, {train_seconds:.0f} s): rewards by window of steps")
    per_task = reward_by_task(out / "grpo", recipe["grpo"]["stages"][0]["data"][0]["path"], window, steps)
    print_table(per_task, "Answer reward of the rollouts per task, first vs last window")

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
    tasks = by_task(submissions, recipe["infer"]["meta"])
    print_table(tasks, "Held-out accuracy per task (%)")

    throughput = rollout_throughput(recipe_path, sft_adapter, args.throughput_prompts, args.throughput_tokens)
    print_table([{"rollouts": name, **{k: v for k, v in row.items()}} for name, row in throughput.items() if name != "speedup"],
                f"Rollout throughput (G={recipe['grpo']['num_generations']} x {args.throughput_prompts} prompts, "
                f"{args.throughput_tokens} tokens each): batched {throughput['speedup']:.2f}x one at a time")
    engines = None
    if args.rollout_engines:
        engines = rollout_engines(recipe_path, sft_adapter, args.throughput_prompts, args.throughput_tokens)
        print_rollout_engines(engines, recipe["grpo"]["num_generations"], args.throughput_prompts, args.throughput_tokens)
    load["end"] = os.getloadavg()
    print(f"load average (1, 5, 15 min): start {load['start']}, end {load['end']}")
    first, last = rows[0]["answer reward"], rows[-1]["answer reward"]
    print(f"answer reward: first window {first:.3f} -> last window {last:.3f}; "
          f"held-out accuracy {paired['accuracy_a']:.1f} -> {paired['accuracy_b']:.1f} (B-A {paired['accuracy_delta']:+.1f}, "
          f"95% CI {lo:+.1f} to {hi:+.1f}, McNemar p={paired['mcnemar_p']:.3g})")
    write_json(args.json, {"machine": info, "load_average": load, "steps": steps, "train_seconds": train_seconds,
                           "bench_seconds": time.perf_counter() - bench_start, "reward_windows": rows, "reward_by_task": per_task,
                           "metrics": records,
                           "held_out": paired, "held_out_by_task": tasks, "rollout_throughput": throughput,
                           "rollout_engines": engines})
    return 0


if __name__ == "__main__":
    sys.exit(main())
