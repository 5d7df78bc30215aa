"""`infer run RECIPE`: answer every benchmark item, writing the submission as batches finish.

Outputs, beside `infer.output` (say `runs/x/submission.jsonl`):
- `submission.jsonl`: `{"id", "thinking_prediction", "answer_prediction"}` per line, the challenge format;
- `submission.raw.jsonl`: per item the raw output, the answer text, the rule that matched it,
  truncation flags, whether the thinking budget fired and whether the thinking was cut, token
  counts and seconds;
- `submission.run.json`: decoding settings, backend, parsing policy and totals;
- `submission.recipe.yaml`: the resolved recipe.

Both JSONL files are appended and flushed per batch. A re-run with the same output skips the ids
already in the submission (a torn last line from a kill is dropped and redone), so no finished work
is lost and no id is written twice. When every item is done, both files are rewritten in the
order of the metadata file.

With `infer.data_parallel_size` N > 1, N worker processes (`infer run ... infer.data_parallel_rank=k`,
each on its own block of `tensor_parallel_size` GPUs) answer every N-th pending item into
`submission.dpK.*` files, logging to `submission.dpK.log`; the parent folds their records into the
main files (also what a re-run does first after a kill), so resuming works the same way.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from core import qwen_omni as qo
from core.items import DataError, Item, load_items
from core.recipe import Recipe, save_recipe
from infer.engine import Engine, Generation, Request, SamplingConfig, checkpoint_generation_defaults, load_engine
from infer.parse import POLICY, parse_output
from infer.submission import append_records, read_records, write_records

# Audio is decoded per chunk of this many items, so a large benchmark never sits in memory at once.
AUDIO_CHUNK = 512


@dataclass(frozen=True)
class RunPaths:
    submission: Path
    raw: Path
    run: Path
    recipe: Path

    @classmethod
    def beside(cls, output: str | Path) -> "RunPaths":
        out = Path(output)
        stem = out.name.removesuffix(".jsonl")
        return cls(out, out.with_name(f"{stem}.raw.jsonl"), out.with_name(f"{stem}.run.json"),
                   out.with_name(f"{stem}.recipe.yaml"))


def item_request(item: Item, tokenizer, prompt_style: str, max_audio_seconds: float) -> Request:
    """Only the audio, the question, the choices and the fixed prompt reach the model (Track 1 rule)."""
    prompt = qo.render_prompt(tokenizer, item.question, item.choices, prompt_style)
    return Request(item.id, prompt, item.load_audio(max_audio_seconds))


def records_for(item: Item, generation: Generation, backend: str) -> tuple[dict, dict]:
    parsed = parse_output(generation.text, item.choices)
    submission = {"id": item.id, "thinking_prediction": parsed.thinking, "answer_prediction": parsed.answer}
    raw = {
        "id": item.id, "raw_output": generation.text, "answer_text": parsed.answer_text, "rule": parsed.rule,
        "matched": parsed.matched, "truncated": parsed.truncated, "finished": generation.finished,
        "thinking_budget_fired": generation.budget_fired, "thinking_cut": parsed.thinking_cut,
        "thinking_chars": len(parsed.thinking), "n_prompt_tokens": generation.n_prompt_tokens,
        "n_generated_tokens": generation.n_generated_tokens, "seconds": round(generation.seconds, 4),
        "backend": backend,
    }
    return submission, raw


def resume_state(paths: RunPaths, known: set[str]) -> set[str]:
    """Ids already answered; the raw file is cut back to them (it is written before the submission)."""
    done: set[str] = set()
    for lineno, record in enumerate(read_records(paths.submission), 1):
        rid = record["id"]
        if rid not in known:
            raise DataError(f"{paths.submission}:{lineno} (id={rid}): id: not in the metadata; "
                            "this output belongs to another benchmark, choose another infer.output")
        if rid in done:
            raise DataError(f"{paths.submission}:{lineno} (id={rid}): id: written twice; the file was not written by `infer run`")
        done.add(rid)
    raw = read_records(paths.raw)
    kept, seen = [], set()
    for record in raw:
        if record["id"] in done and record["id"] not in seen:
            kept.append(record)
            seen.add(record["id"])
    if len(kept) != len(raw):
        write_records(paths.raw, kept)
    return done


def totals(raw_records: list[dict], n_items: int) -> dict:
    rules: dict[str, int] = {}
    for record in raw_records:
        rules[record["rule"]] = rules.get(record["rule"], 0) + 1
    generated = sum(r["n_generated_tokens"] for r in raw_records)
    seconds = sum(r["seconds"] for r in raw_records)
    return {
        "items": n_items, "done": len(raw_records),
        "truncated": sum(r["truncated"] for r in raw_records),  # no </think>
        "cut_by_budget": sum(not r["finished"] for r in raw_records),  # max_new_tokens reached
        "unmatched": sum(not r["matched"] for r in raw_records),
        # records from before the thinking budget lack the two keys
        "thinking_budget_fired": sum(r.get("thinking_budget_fired", False) for r in raw_records),
        "thinking_cut": sum(r.get("thinking_cut", False) for r in raw_records),
        "rules": dict(sorted(rules.items())),
        "prompt_tokens": sum(r["n_prompt_tokens"] for r in raw_records),
        "generated_tokens": generated,
        "generation_seconds": round(seconds, 3),  # summed over batches: per-process rates below
        "samples_per_s": round(len(raw_records) / seconds, 3) if seconds else None,
        "generated_tokens_per_s": round(generated / seconds, 2) if seconds else None,
    }


def benchmark_items(recipe: Recipe) -> tuple[list[Item], list[Item]]:
    """(every item of the metadata, the ones this run answers: the first `infer.limit`)."""
    items = load_items(recipe.infer.meta, recipe.infer.audio_root, check_audio=True)
    return items, items[: recipe.infer.limit] if recipe.infer.limit is not None else items


def run(recipe: Recipe, engine: Engine | None = None, on_batch: Callable[[int], None] | None = None) -> dict:
    """Answer the pending items of `recipe.infer.meta`; returns the run summary (also written to disk).

    `engine`: reuse an already loaded one (tests, benchmarks); `on_batch(n_written)` is called after
    each batch is on disk. With `infer.data_parallel_size` > 1 the work is spread over worker processes.
    """
    cfg = recipe.infer
    if cfg.data_parallel_size > 1 and cfg.data_parallel_rank is None:
        return run_data_parallel(recipe)
    every, items = benchmark_items(recipe)
    paths = RunPaths.beside(cfg.output)
    paths.submission.parent.mkdir(parents=True, exist_ok=True)
    if cfg.data_parallel_rank is not None:  # a worker: its share of what the main output lacks
        rank, size = cfg.data_parallel_rank, cfg.data_parallel_size
        in_main = {r["id"] for r in read_records(paths.submission)}
        items = [item for n, item in enumerate(items) if n % size == rank and item.id not in in_main]
        paths = RunPaths.beside(shard_output(cfg.output, rank))
    save_recipe(recipe, paths.recipe)
    done = resume_state(paths, {item.id for item in every})
    pending = [item for item in items if item.id not in done]
    print(f"infer: {len(items)} items, {len(done)} already in {paths.submission}, {len(pending)} to answer")
    engine = engine or (load_engine(recipe) if pending else None)
    started = time.perf_counter()
    written = answer(recipe, engine, pending, paths, on_batch) if pending else 0
    return finish(recipe, paths, every, items, engine.describe() if engine else None,
                  engine.sampling.to_dict() if engine else None, written, time.perf_counter() - started)


def answer(recipe: Recipe, engine: Engine, pending: list[Item], paths: RunPaths,
           on_batch: Callable[[int], None] | None) -> int:
    by_id = {item.id: item for item in pending}
    written = 0
    with tqdm(total=len(pending), desc="infer", unit="item") as progress:
        for start in range(0, len(pending), AUDIO_CHUNK):
            chunk = pending[start:start + AUDIO_CHUNK]
            requests = [item_request(i, engine.tokenizer, recipe.model.prompt_style, recipe.data.max_audio_seconds)
                        for i in chunk]
            for batch in engine.generate_batches(requests):
                pairs = [records_for(by_id[g.id], g, engine.name) for g in batch]
                append_records(paths.raw, [raw for _, raw in pairs])  # raw first: resume trusts the submission
                append_records(paths.submission, [sub for sub, _ in pairs])
                written += len(batch)
                progress.update(len(batch))
                tokens = sum(g.n_generated_tokens for g in batch)
                progress.set_postfix(tok_s=f"{tokens / max(sum(g.seconds for g in batch), 1e-9):.1f}")
                if on_batch is not None:
                    on_batch(written)
    return written


def finish(recipe: Recipe, paths: RunPaths, every: list[Item], items: list[Item], engine: dict | None,
           sampling: dict | None, written: int, seconds: float) -> dict:
    """Order the files once `items` are all done; write and return the run summary."""
    raw_records = read_records(paths.raw)
    complete = {item.id for item in items} <= {r["id"] for r in raw_records}
    if complete:  # put both files in metadata order
        order = {item.id: n for n, item in enumerate(every)}
        write_records(paths.raw, sorted(raw_records, key=lambda r: order[r["id"]]))
        write_records(paths.submission, sorted(read_records(paths.submission), key=lambda r: order[r["id"]]))
    summary = {
        "output": str(paths.submission), "meta": recipe.infer.meta, "model": recipe.model.path,
        "adapter": recipe.infer.adapter, "prompt_style": recipe.model.prompt_style, "complete": complete,
        "engine": engine, "sampling": sampling, "parse_policy": POLICY,
        "this_invocation": {"answered": written, "wall_seconds": round(seconds, 3)},
        "totals": totals(raw_records, len(items)),
    }
    if engine is not None or not paths.run.is_file():  # a run with nothing left to do keeps the last settings
        paths.run.write_text(json.dumps(summary, indent=2) + "\n")
    t = summary["totals"]
    print(f"infer: {t['done']}/{t['items']} done -> {paths.submission} | truncated {t['truncated']}, "
          f"unmatched {t['unmatched']}, thinking budget fired {t['thinking_budget_fired']}, thinking cut "
          f"{t['thinking_cut']}, {t['generated_tokens_per_s']} generated tok/s")
    return summary


def shard_output(output: str | Path, rank: int) -> Path:
    out = Path(output)
    return out.with_name(f"{out.name.removesuffix('.jsonl')}.dp{rank}.jsonl")


def fold_shards(paths: RunPaths, known: set[str], size: int) -> None:
    """Move the workers' finished records into the main files, then delete the workers' files."""
    done = resume_state(paths, known)
    for rank in range(size):
        shard = RunPaths.beside(shard_output(paths.submission, rank))
        subs = [r for r in read_records(shard.submission) if r["id"] not in done]
        ids = {r["id"] for r in subs}
        append_records(paths.raw, [r for r in read_records(shard.raw) if r["id"] in ids])
        append_records(paths.submission, subs)
        done |= ids
        for path in (shard.submission, shard.raw, shard.run, shard.recipe):
            path.unlink(missing_ok=True)


def worker_devices(rank: int, per_worker: int) -> str | None:
    """CUDA_VISIBLE_DEVICES of one worker: its own block of tensor-parallel GPUs (None on a CPU machine)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        import torch

        if not torch.cuda.is_available():
            return None
        visible = ",".join(str(i) for i in range(torch.cuda.device_count()))
    devices = [d for d in visible.split(",") if d.strip()]
    block = devices[rank * per_worker:(rank + 1) * per_worker]
    if len(block) < per_worker:
        raise ValueError(f"infer.data_parallel_size x infer.tensor_parallel_size needs {(rank + 1) * per_worker} "
                         f"GPUs, {len(devices)} visible ({visible})")
    return ",".join(block)


def run_data_parallel(recipe: Recipe) -> dict:
    """One worker process per rank (`infer run` on its share), then one merged, ordered submission."""
    cfg = recipe.infer
    every, items = benchmark_items(recipe)
    known = {item.id for item in every}
    paths = RunPaths.beside(cfg.output)
    paths.submission.parent.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, paths.recipe)
    fold_shards(paths, known, cfg.data_parallel_size)  # leftovers of an interrupted run
    started = time.perf_counter()
    before = len(read_records(paths.submission))
    workers = []
    for rank in range(cfg.data_parallel_size):
        env = dict(os.environ)
        devices = worker_devices(rank, cfg.tensor_parallel_size)
        if devices is not None:
            env["CUDA_VISIBLE_DEVICES"] = devices
        log = shard_output(cfg.output, rank).with_suffix(".log")
        command = [sys.executable, "-m", "infer", "run", str(paths.recipe), f"infer.data_parallel_rank={rank}"]
        with log.open("w") as handle:
            workers.append((rank, log, subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)))
    print(f"infer: {len(workers)} data-parallel workers, logs in {paths.submission.parent}/*.dp*.log")
    failed = [(rank, log) for rank, log, process in workers if process.wait() != 0]
    fold_shards(paths, known, cfg.data_parallel_size)
    written = len(read_records(paths.submission)) - before
    sampling = SamplingConfig.resolve(cfg, checkpoint_generation_defaults(recipe.model.path)).to_dict()
    engine = {"backend": cfg.backend, "data_parallel_size": cfg.data_parallel_size,
              "tensor_parallel_size": cfg.tensor_parallel_size, "batch_size": cfg.batch_size}
    summary = finish(recipe, paths, every, items, engine, sampling, written, time.perf_counter() - started)
    if failed:
        raise RuntimeError("data-parallel workers failed (finished work is kept; re-run to resume): "
                           + ", ".join(f"rank {rank}, see {log}" for rank, log in failed))
    return summary
