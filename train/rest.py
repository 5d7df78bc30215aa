"""The self-improvement loop (ReST / rejection-sampling fine-tuning), from a recipe's `rest` section.

    python train/rest.py recipes/tiny_hard.yaml [rest.samples=8 ...]         (or python -m train.rest run ...)
    python -m train.rest buckets RECIPE --adapter A --out data/grpo/hard.jsonl [--low 1 --high 3]

Per iteration N (1, 2, ... one per learning rate of `rest.lrs`), in `rest.output_dir`/iter-N/:
    samples/chunk-NNNN.jsonl  K sampled completions of each item of the chunk (the engine of `infer.backend`, with
                              the adapter of the previous iteration merged, or `rest.init_adapter` for the first)
    scores.jsonl              per item: passes of K under the official answer rule (core/answer_rule.py), its band
    histogram.json            items per number of passes (0..K) and per band: the pass-rate histogram
    selected.jsonl            the kept samples, their weights and why (`rest.selection`, `select` below)
    data/weight-W.jsonl       the SFT file: each kept sample's reasoning as the item's `thinking`, with provenance
    data.json                 which adapter sampled it (path and weights' sha256), files, counts, weights, sha256s
    sft_recipe.yaml, sft/     the iteration's SFT, launched as `make train` launches train/sft.py: sft/adapter
    trained.json              written when that SFT has finished
With `rest.final_histogram`, iter-(N+1)/ holds the last adapter's samples, scores and histogram only.

Every step writes its outputs whole (a temporary file, then a rename) and is skipped when they are there, so a loop
killed anywhere resumes where it stopped and writes the same bytes as one that was never stopped (a sampling chunk's
seed is a function of (rest.seed, iteration, chunk); the SFT resumes from its own checkpoints).

Per-sample weights are the SFT mixture's: kept samples are grouped by weight into one file each, listed in
`data.train` with weight W x (samples in the file), so that every sample's share of an epoch is proportional to its
W (train/data.py `mix`: a group is repeated or subsampled to its share; weight 0.5 keeps a seeded half of its group).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Sequence

import numpy as np

# `python train/rest.py` puts train/ first on sys.path, not the repo.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core import qwen_omni as qo  # noqa: E402
from core.answer_rule import is_correct  # noqa: E402
from core.items import DataError, Item, load_items  # noqa: E402
from core.provenance import sha256_file  # noqa: E402
from core.recipe import (  # noqa: E402
    DatasetSpec,
    Recipe,
    RecipeError,
    changed_settings,
    load_recipe,
    result_keys,
    save_recipe,
    split_cli,
)
from infer.parse import parse_output  # noqa: E402
from infer.submission import write_records  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PLACEHOLDERS = (qo.AUDIO_PAD, qo.IMAGE_PAD, qo.VIDEO_PAD)
# The published learning zone (16 samples per item): 0 skip | 1-3 keep all | 4-11 keep the 3 shortest, weight 1.5 |
# 12-14 keep 1, weight 0.5 | 15-16 skip (or a fraction). Scaled to K by the share of passes: a band ends where
# passes / K <= its upper bound / 16, which for K = 16 gives exactly the published bands (integer arithmetic).
BAND_UPPER_OF_16 = {"low": 3, "middle": 11, "high": 14}
BAND_WEIGHTS = {"low": 1.0, "middle": 1.5, "high": 0.5, "top": 0.5}
# what a loop folder may only be resumed with: every setting of these that changes results (core.recipe.result_keys)
RESULT_SECTIONS = ("model", "data", "lora", "train", "rest", "infer.backend", "infer.max_audio_seconds")


def band(passes: int, samples: int) -> str:
    """The learning-zone band of an item with `passes` correct of `samples`: none, low, middle, high or top."""
    if passes == 0:
        return "none"
    for name, upper in BAND_UPPER_OF_16.items():
        if 16 * passes <= upper * samples:
            return name
    return "top"


def select(scores: Sequence[dict], rule: str, shortest_k: int = 3, all_correct_fraction: float = 0.0,
           seed: int = 0) -> list[dict]:
    """The kept samples of scored items, as {id, sample, weight, band}.

    `scores`: per item {id, passes, samples, correct: [bool per sample], tokens: [generated tokens per sample]} and
    optionally trainable: [bool per sample] (default all): only correct samples that are trainable are kept; the band
    is the pass rate's. Shortest means fewest generated tokens (ties: the lower sample index).
    Shortest means fewest generated tokens (ties: the lower sample index).
    - learning_zone: none: skip; low: every correct sample, weight 1; middle: the `shortest_k` shortest, weight 1.5;
      high: the shortest, weight 0.5; top: skipped, but for a seeded `all_correct_fraction` of those items the
      shortest at weight 0.5.
    - all_correct: every correct sample, weight 1. shortest_k: the `shortest_k` shortest correct, weight 1.
    """
    if rule not in ("learning_zone", "all_correct", "shortest_k"):
        raise ValueError(f"unknown selection rule {rule!r}")
    rng = np.random.default_rng(seed)
    kept = []
    for item in scores:
        trainable = item.get("trainable") or [True] * len(item["correct"])
        correct = sorted((tokens, j) for j, (ok, fit, tokens) in enumerate(zip(item["correct"], trainable, item["tokens"]))
                         if ok and fit)
        name = band(item["passes"], item["samples"])
        if rule == "all_correct":
            chosen, weight = correct, 1.0
        elif rule == "shortest_k":
            chosen, weight = correct[:shortest_k], 1.0
        else:
            # drawn for every top-band item, kept or not: which items a fraction keeps does not depend on the others
            keep_top = name == "top" and rng.random() < all_correct_fraction
            count = {"none": 0, "low": len(correct), "middle": shortest_k, "high": 1, "top": int(keep_top)}[name]
            chosen, weight = correct[:count], BAND_WEIGHTS.get(name, 0.0)
        kept += [{"id": item["id"], "sample": j, "weight": weight, "band": name} for _, j in sorted(chosen, key=lambda c: c[1])]
    return kept


def histogram(scores: Sequence[dict], samples: int) -> dict:
    """Items per number of passes (0..K), per band, and the mean pass rate."""
    passes = Counter(s["passes"] for s in scores)
    bands = Counter(band(s["passes"], samples) for s in scores)
    return {
        "samples": samples, "items": len(scores),
        "passes": {str(n): passes.get(n, 0) for n in range(samples + 1)},
        "bands": {name: bands.get(name, 0) for name in ("none", "low", "middle", "high", "top")},
        "mean_pass_rate": round(sum(s["passes"] for s in scores) / max(1, samples * len(scores)), 4),
    }


# ---------------------------------------------------------------- files written whole


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]




def adapter_identity(adapter: str | None) -> dict:
    """Which weights sampled: the adapter folder and its weights' sha256 (None: the base model)."""
    if adapter is None:
        return {"adapter": None}
    weights = sorted(Path(adapter).glob("adapter_model.*"))
    if not weights:
        raise FileNotFoundError(f"{adapter}: no LoRA adapter there (adapter_model.* missing)")
    return {"adapter": str(adapter), "sha256": sha256_file(weights[0])}


# ---------------------------------------------------------------- the steps


def loop_items(recipe: Recipe) -> list[Item]:
    """The items every iteration samples: rest.items (or data.train), at most rest.max_items of them (seeded)."""
    specs = recipe.rest.items or recipe.data.train
    if not specs:
        raise RecipeError("rest.items and data.train are both empty: the loop has no items to sample")
    items: list[Item] = []
    for spec in specs:
        items += load_items(spec.path, spec.audio_root, check_audio=True)
    if len({it.id for it in items}) != len(items):
        raise DataError(f"rest.items: an id is listed twice across {[s.path for s in specs]}")
    if recipe.rest.max_items is not None and recipe.rest.max_items < len(items):
        keep = np.sort(np.random.default_rng(recipe.rest.seed).permutation(len(items))[:recipe.rest.max_items])
        items = [items[i] for i in keep]
    return items


def sampling_seed(seed: int, iteration: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, iteration, chunk]).generate_state(1)[0])


def sampling_recipe(recipe: Recipe, adapter: str | None) -> Recipe:
    """The recipe whose `infer` section samples the loop's completions with `adapter`."""
    rest = recipe.rest
    infer = recipe.infer.model_copy(update=dict(
        adapter=adapter, do_sample=True, temperature=rest.temperature, top_p=rest.top_p, top_k=0,
        max_new_tokens=rest.max_new_tokens, batch_size=rest.batch_size, thinking_budget=None))
    return recipe.model_copy(update={"infer": infer})


def trainable(generation, parsed) -> bool:
    """A sample can be an SFT target: it ended its turn after a closed thinking, and wrote no multimodal placeholder
    (fed back as a target, one would be taken for an audio position)."""
    return generation.finished and not parsed.truncated and not any(t in generation.text for t in PLACEHOLDERS)


def sample_records(engine, chunk: Sequence[Item], recipe: Recipe, seed: int) -> list[dict]:
    """K completions of every item of `chunk` (one generate call), each scored by the official answer rule."""
    from infer.run import item_request

    k = recipe.rest.samples
    # always the item's own clip (infer.audio_ablation is an evaluation setting, not training data)
    requests = [item_request(item, engine.tokenizer, recipe.model.prompt_style, recipe.infer.max_audio_seconds)
                for item in chunk]
    # n per prompt: vLLM samples the K at once, the hf engine repeats each request K times (a sample per row)
    generations = engine.generate_groups(requests, k, engine.sampling.replace(seed=seed))
    records = []
    for n, generation in enumerate(generations):
        item = chunk[n // k]
        parsed = parse_output(generation.text, item.choices)
        records.append({
            "id": item.id, "sample": n % k, "text": generation.text, "thinking": parsed.thinking,
            "answer_prediction": parsed.answer, "correct": is_correct(parsed.answer, item.answer, item.choices),
            "generated_tokens": generation.n_generated_tokens, "finished": generation.finished,
            "trainable": trainable(generation, parsed),
        })
    return records


def sample_and_score(recipe: Recipe, items: list[Item], folder: Path, iteration: int, adapter: str | None,
                     log=print) -> list[dict]:
    """samples/chunk-*.jsonl (each skipped when there), then scores.jsonl and histogram.json; returns the scores."""
    rest = recipe.rest
    chunks = [items[i:i + rest.chunk_items] for i in range(0, len(items), rest.chunk_items)]
    paths = [folder / "samples" / f"chunk-{c:04d}.jsonl" for c in range(len(chunks))]
    missing = [c for c, path in enumerate(paths) if not path.is_file()]
    if missing:
        from infer.engine import load_engine

        engine = load_engine(sampling_recipe(recipe, adapter))
        for c in missing:
            start = time.perf_counter()
            write_records(paths[c], sample_records(engine, chunks[c], recipe, sampling_seed(rest.seed, iteration, c)))
            log(f"rest: iteration {iteration}: chunk {c + 1}/{len(chunks)} sampled "
                f"({len(chunks[c])} items x {rest.samples}, {time.perf_counter() - start:.1f} s)")
        del engine
        gc.collect()
    by_item: dict[str, list[dict]] = {}
    for path in paths:
        for record in read_jsonl(path):
            by_item.setdefault(record["id"], []).append(record)
    scores = []
    for item in items:
        got = sorted(by_item.get(item.id, []), key=lambda r: r["sample"])
        if [r["sample"] for r in got] != list(range(rest.samples)):
            raise DataError(f"{folder / 'samples'}: item {item.id}: samples {[r['sample'] for r in got]}, "
                            f"expected 0..{rest.samples - 1} (rest.samples changed? start a new rest.output_dir)")
        correct = [r["correct"] for r in got]
        passes = sum(correct)
        scores.append({"id": item.id, "passes": passes, "samples": rest.samples, "pass_rate": round(passes / rest.samples, 4),
                       "band": band(passes, rest.samples), "correct": correct, "trainable": [r["trainable"] for r in got],
                       "tokens": [r["generated_tokens"] for r in got]})
    if not (folder / "scores.jsonl").is_file():
        write_records(folder / "scores.jsonl", scores)
    if not (folder / "histogram.json").is_file():
        write_json(folder / "histogram.json", {"iteration": iteration, **adapter_identity(adapter), **histogram(scores, rest.samples)})
    return scores


def sft_records(items: list[Item], kept: list[dict], folder: Path, iteration: int, sampled_with: dict) -> dict[float, list[dict]]:
    """The SFT records of the kept samples, grouped by weight: the item's own fields, its `thinking` the sample's,
    `audio_path` relative to the data folder, and `rest` saying where the sample came from."""
    by_id = {it.id: it for it in items}
    samples = {}
    for path in sorted((folder / "samples").glob("chunk-*.jsonl")):
        for record in read_jsonl(path):
            samples[(record["id"], record["sample"])] = record
    data_dir = folder / "data"
    groups: dict[float, list[dict]] = {}
    for keep in kept:
        item, sample = by_id[keep["id"]], samples[(keep["id"], keep["sample"])]
        # one record per kept sample: ids stay unique within a file (the SFT data cache requires it)
        record = {**item.meta, "id": f"{item.id}#{keep['sample']}",
                  "audio_path": os.path.relpath(item.audio_path.resolve(), data_dir.resolve()),
                  "thinking": sample["thinking"], "answer": item.answer,
                  "rest": {"iteration": iteration, "item": item.id, "sampled_with": sampled_with, "sample": keep["sample"],
                           "band": keep["band"], "weight": keep["weight"]}}
        groups.setdefault(keep["weight"], []).append(record)
    return groups


def write_data(recipe: Recipe, items: list[Item], folder: Path, iteration: int, adapter: str | None,
               scores: list[dict]) -> dict:
    """selected.jsonl, data/weight-W.jsonl and data.json (last: its presence says the step is done)."""
    rest = recipe.rest
    if (folder / "data.json").is_file():
        return json.loads((folder / "data.json").read_text())
    kept = select(scores, rest.selection, rest.shortest_k, rest.all_correct_fraction, rest.seed + iteration)
    write_records(folder / "selected.jsonl", kept)
    sampled_with = adapter_identity(adapter)
    files = []
    for weight, records in sorted(sft_records(items, kept, folder, iteration, sampled_with).items()):
        path = folder / "data" / f"weight-{weight:g}.jsonl"
        write_records(path, records)
        files.append({"path": str(path), "weight": weight, "samples": len(records),
                      "items": len({r["rest"]["item"] for r in records}), "sha256": sha256_file(path)})
    manifest = {"iteration": iteration, "sampled_with": sampled_with, "selection": rest.selection,
                "samples_per_item": rest.samples, "items": len(items), "kept_samples": len(kept),
                "kept_items": len({k["id"] for k in kept}), "files": files}
    write_json(folder / "data.json", manifest)
    return manifest


def sft_recipe(recipe: Recipe, folder: Path, iteration: int, adapter: str | None, manifest: dict) -> Recipe:
    """The iteration's SFT recipe: the kept samples (a weight group's mixture weight = W x its samples), the
    iteration's learning rate, from `adapter` (rest.train_from: previous) or a fresh adapter."""
    rest = recipe.rest
    if not manifest["files"]:
        raise DataError(f"{folder / 'data.json'}: iteration {iteration} kept no sample: nothing to train on "
                        f"(every item at 0 passes, or rest.selection keeps none)")
    data = recipe.data.model_copy(update={"train": [
        DatasetSpec(path=f["path"], weight=f["weight"] * f["samples"]) for f in manifest["files"]]})
    train = recipe.train.model_copy(update={
        "output_dir": str(folder / "sft"), "lr": rest.lrs[iteration - 1], "epochs": rest.epochs or recipe.train.epochs,
        "init_adapter": adapter if rest.train_from == "previous" else None})
    return recipe.model_copy(update={"data": data, "train": train})


def run_sft(recipe_path: Path, launch_config: str | None, log=print) -> None:
    """train/sft.py on `recipe_path`, launched as `make train` does (Accelerate with `launch_config`, or one process)."""
    script = str(REPO / "train" / "sft.py")
    if launch_config:
        command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", launch_config, script, str(recipe_path)]
    else:
        command = [sys.executable, script, str(recipe_path)]
    log("rest: " + " ".join(command))
    result = subprocess.run(command)
    if result.returncode:
        raise RuntimeError(f"rest: SFT exited with {result.returncode} ({' '.join(command)}); rerun the loop to resume")


def train_iteration(recipe: Recipe, folder: Path, iteration: int, adapter: str | None, manifest: dict, log=print) -> str:
    """The iteration's SFT (skipped when trained.json is there); returns its adapter."""
    done = folder / "trained.json"
    out = folder / "sft" / "adapter"
    if done.is_file():
        return str(out)
    tuned = sft_recipe(recipe, folder, iteration, adapter, manifest)
    path = save_recipe(tuned, folder / "sft_recipe.yaml")
    start = time.perf_counter()
    run_sft(path, recipe.rest.launch_config, log)
    if not (out / "adapter_config.json").is_file():
        raise RuntimeError(f"rest: SFT of iteration {iteration} wrote no adapter at {out} (train.stop_after?); rerun to resume")
    write_json(done, {"iteration": iteration, "adapter": str(out), "lr": tuned.train.lr, "init_adapter": tuned.train.init_adapter,
                      "seconds": round(time.perf_counter() - start, 1)})
    return str(out)


def run(recipe: Recipe, log=print) -> dict:
    """Every iteration of the loop (each step skipped when done); returns the summary also written to summary.json."""
    rest = recipe.rest
    out = Path(rest.output_dir)
    if (out / "recipe.yaml").is_file():  # resuming: only with the settings that made what is there
        changed = changed_settings(out / "recipe.yaml", recipe, result_keys(recipe, RESULT_SECTIONS))
        if changed:
            raise RecipeError(f"{out}: holds a loop made with other settings ({out / 'recipe.yaml'}); differing: "
                              + "; ".join(changed) + ". Restore them, or choose another rest.output_dir")
    out.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, out / "recipe.yaml")
    items = loop_items(recipe)
    log(f"rest: {len(items)} items x {rest.samples} samples, {len(rest.lrs)} iteration(s), selection {rest.selection}")
    adapter = rest.init_adapter
    summary = {"items": len(items), "samples": rest.samples, "selection": rest.selection, "iterations": []}
    for iteration, lr in enumerate(rest.lrs, start=1):
        folder = out / f"iter-{iteration}"
        scores = sample_and_score(recipe, items, folder, iteration, adapter, log)
        manifest = write_data(recipe, items, folder, iteration, adapter, scores)
        hist = json.loads((folder / "histogram.json").read_text())
        log(f"rest: iteration {iteration}: passes {hist['passes']}, bands {hist['bands']}; kept {manifest['kept_samples']} "
            f"samples of {manifest['kept_items']} items")
        adapter = train_iteration(recipe, folder, iteration, adapter, manifest, log)
        summary["iterations"].append({"iteration": iteration, "lr": lr, "histogram": hist, "data": str(folder / "data.json"),
                                      "adapter": adapter})
    if rest.final_histogram:
        folder = out / f"iter-{len(rest.lrs) + 1}"
        sample_and_score(recipe, items, folder, len(rest.lrs) + 1, adapter, log)
        summary["final_histogram"] = json.loads((folder / "histogram.json").read_text())
    write_json(out / "summary.json", summary)
    log(f"rest: done, adapter {adapter}; summary in {out / 'summary.json'}")
    return summary


# ---------------------------------------------------------------- curation: pass-rate buckets


def buckets(recipe: Recipe, adapter: str | None, out: Path, low: int, high: int, log=print) -> dict:
    """Sample and score every item (rest.samples each, the loop's machinery, in `out`'s work folder), then write the
    items whose passes lie in [low, high] to `out` (e.g. the GRPO boundary set: 1-3 of 8) and every item's statistics
    to `out`.stats.jsonl. A rerun reuses the samples."""
    items = loop_items(recipe)
    work = out.with_name(out.stem + ".work")
    scores = sample_and_score(recipe, items, work, 0, adapter, log)
    by_id = {it.id: it for it in items}
    stats = [{"id": s["id"], "passes": s["passes"], "samples": s["samples"], "pass_rate": s["pass_rate"],
              "bucket": "in" if low <= s["passes"] <= high else ("below" if s["passes"] < low else "above")} for s in scores]
    chosen = []
    for stat in stats:
        if stat["bucket"] == "in":
            item = by_id[stat["id"]]
            chosen.append({**item.meta, "audio_path": os.path.relpath(item.audio_path.resolve(), out.parent.resolve()),
                           "curation": {"rule": f"passes in [{low}, {high}] of {stat['samples']}", **adapter_identity(adapter),
                                        "passes": stat["passes"], "samples": stat["samples"]}})
    write_records(out.with_name(out.stem + ".stats.jsonl"), stats)
    write_records(out, chosen)
    counts = Counter(s["bucket"] for s in stats)
    summary = {"out": str(out), "items": len(stats), "kept": len(chosen), "below": counts.get("below", 0),
               "above": counts.get("above", 0), "histogram": histogram(scores, recipe.rest.samples)}
    log(f"buckets: {len(chosen)} of {len(stats)} items with {low}-{high} passes of {recipe.rest.samples} -> {out}")
    return summary


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = argv[0] if argv and argv[0] in ("run", "buckets") else "run"
    rest_args = argv[1:] if argv and argv[0] in ("run", "buckets") else argv
    parser = argparse.ArgumentParser(prog=f"python -m train.rest {command}", description=__doc__.splitlines()[0])
    parser.add_argument("recipe", nargs="*", help="RECIPE.yaml [dotted.key=value ...]")
    if command == "buckets":
        parser.add_argument("--adapter", default=None, help="LoRA adapter that samples (default: rest.init_adapter)")
        parser.add_argument("--out", required=True, help="JSONL of the items in the bucket (statistics beside it)")
        parser.add_argument("--low", type=int, default=1, help="fewest passes kept")
        parser.add_argument("--high", type=int, default=3, help="most passes kept")
    args = parser.parse_args(rest_args)
    try:
        recipe = load_recipe(*split_cli(args.recipe))
        if command == "buckets":
            summary = buckets(recipe, args.adapter or recipe.rest.init_adapter, Path(args.out), args.low, args.high)
            print(json.dumps(summary, indent=2))
        else:
            run(recipe)
    except (RecipeError, DataError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
