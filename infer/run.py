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
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from core import qwen_omni as qo
from core.items import DataError, Item, load_items
from core.locks import LockBusy, file_lock, holder_note
from core.progress import library_bars_off_a_terminal, progress
from core.recipe import Recipe, changed_settings, result_keys, save_recipe
from infer.ablation import donors, request_audio
from infer.engine import Engine, Generation, Request, SamplingConfig, checkpoint_generation_defaults, load_engine, request_length
from infer.parse import POLICY, parse_output
from infer.self_consistency import ChainCollector, chain_requests, chain_sampling, vote_chains
from infer.submission import append_records, read_records, write_records

# Audio is decoded per chunk of this many items, so a large benchmark never sits in memory at once.
AUDIO_CHUNK = 512
PARENT_PID_ENV = "INFER_PARENT_PID"  # set for data-parallel workers: they exit when this process dies


class OutputBusy(RuntimeError):
    """Another process is writing the same inference output."""


@contextmanager
def output_lock(output: Path):
    """Hold an exclusive lock on `output` (a `.lock` file beside it) or fail at once naming the holder."""
    with ExitStack() as held:
        try:
            held.enter_context(file_lock(output.with_name(f"{output.name}.lock"), wait=False, note=holder_note()))
        except LockBusy as busy:
            raise OutputBusy(f"{output}: another `infer run` is writing it ({busy.holder}); wait for it to finish, "
                             "or choose another infer.output") from None
        yield


def exit_with_parent(poll_s: float = 0.5) -> None:
    """In a data-parallel worker: exit as soon as the parent that started it is gone (killed), instead of
    writing on as an orphan beside a new run. Finished batches are on disk already."""
    parent = int(os.environ[PARENT_PID_ENV])

    def watch():
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"infer worker {os.getpid()}: parent {parent} is gone, exiting (finished work is kept)",
              file=sys.stderr, flush=True)
        os._exit(3)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


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


def item_request(item: Item, tokenizer, prompt_style: str, max_audio_seconds: float | None,
                 ablation: str = "none", donor: Item | None = None) -> Request:
    """Only the audio, the question, the choices and the fixed prompt reach the model (Track 1 rule).
    The clip is whole unless `max_audio_seconds` (infer.max_audio_seconds) cuts it; `ablation`
    (infer.audio_ablation) replaces it by silence or by `donor`'s clip (infer/ablation.py)."""
    prompt = qo.render_prompt(tokenizer, item.question, item.choices, prompt_style)
    return Request(item.id, prompt, request_audio(item, ablation, donor, max_audio_seconds))


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
    """(every item of the metadata, the ones this run answers: the first `infer.limit`).

    Clips are not opened here: `check_clips` does that for the items still pending."""
    items = load_items(recipe.infer.meta, recipe.infer.audio_root, check_audio=False)
    return items, items[: recipe.infer.limit] if recipe.infer.limit is not None else items


# What inference reads (data.max_audio_seconds is training's: infer.max_audio_seconds cuts its clips).
SECTIONS = ("model", "infer")


def check_resumable(paths: RunPaths, recipe: Recipe) -> None:
    """An output that holds answers may only be continued with the settings that wrote them: every model.* and
    infer.* key that changes results (core.recipe.result_keys); other values would mix two runs in one file."""
    if not paths.recipe.is_file() or not read_records(paths.submission):
        return
    changed = changed_settings(paths.recipe, recipe, result_keys(recipe, SECTIONS))
    if changed:
        raise DataError(f"{paths.submission}: holds answers written with other settings ({paths.recipe}); resuming "
                        "would mix two runs in one file. Differing: " + "; ".join(changed)
                        + ". Restore them, or choose another infer.output")


def check_clips(items: list[Item], fail_fast: bool) -> dict[str, str]:
    """{id: why} for the items whose clip is missing or unreadable, from file headers only (fast)."""
    failed = {}
    for item in items:
        try:
            item.audio_samples()
        except DataError as err:
            if fail_fast:
                raise
            failed[item.id] = str(err)
    return failed


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
    if cfg.data_parallel_rank is not None:  # a worker: its share of what the main output lacks
        if PARENT_PID_ENV in os.environ:
            exit_with_parent()
        rank, size = cfg.data_parallel_rank, cfg.data_parallel_size
        in_main = {r["id"] for r in read_records(paths.submission)}
        items = [item for n, item in enumerate(items) if n % size == rank and item.id not in in_main]
        paths = RunPaths.beside(shard_output(cfg.output, rank))
    with output_lock(paths.submission):
        check_resumable(paths, recipe)
        save_recipe(recipe, paths.recipe)
        done = resume_state(paths, {item.id for item in every})
        pending = [item for item in items if item.id not in done]
        failed = check_clips(pending, cfg.fail_fast)
        pending = [item for item in pending if item.id not in failed]
        print(f"infer: {len(items)} items, {len(done)} already in {paths.submission}, {len(pending)} to answer"
              + (f", {len(failed)} with an unreadable clip: {', '.join(failed)}" if failed else ""))
        library_bars_off_a_terminal()
        engine = engine or (load_engine(recipe) if pending else None)
        started = time.perf_counter()
        swaps = donors(every, cfg.audio_ablation, cfg.seed)
        written = answer(recipe, engine, pending, paths, on_batch, failed, swaps) if pending else 0
        return finish(recipe, paths, every, items, engine.describe() if engine else None,
                      run_sampling(engine.sampling, recipe).to_dict() if engine else None, written, time.perf_counter() - started, failed)


def prompt_too_long(request: Request, tokenizer, context: int | None, max_token_chars: int) -> str | None:
    """Why a request cannot fit the model's context, or None. A prompt whose characters could not fit
    even at the longest token of the vocabulary is refused without tokenizing it (megabytes take minutes)."""
    if context is None:
        return None
    if len(request.prompt) > context * max_token_chars:
        return f"prompt: {len(request.prompt):,} characters cannot fit the model's context of {context:,} tokens"
    n = request_length(request, tokenizer)
    if n >= context:
        return f"prompt: {n:,} tokens (audio included) exceed the model's context of {context:,} tokens"
    return None


def build_requests(recipe: Recipe, engine: Engine, chunk: list[Item], failed: dict[str, str],
                   swaps: dict[str, Item] | None = None) -> list[Request]:
    """Decode a chunk's clips into requests; a clip that fails to decode is recorded in `failed`
    (or raised with infer.fail_fast). `swaps`: id -> the item whose clip it hears (infer.audio_ablation swap)."""
    requests = []
    for item in chunk:
        try:
            requests.append(item_request(item, engine.tokenizer, recipe.model.prompt_style, recipe.infer.max_audio_seconds,
                                         recipe.infer.audio_ablation, (swaps or {}).get(item.id)))
        except DataError as err:
            if recipe.infer.fail_fast:
                raise
            failed[item.id] = str(err)
    return requests


def run_sampling(sampling: SamplingConfig, recipe: Recipe) -> SamplingConfig:
    """The engine's sampling, or under self-consistency the chains' (infer/self_consistency.py)."""
    sc = recipe.infer.self_consistency
    return sampling if sc is None else chain_sampling(sampling, sc)


def voted_records(item: Item, chains: list[Generation], backend: str, selection: str) -> tuple[dict, dict]:
    """The records of the chain the vote submits, its raw line holding every chain and the vote."""
    chosen, extra = vote_chains(item, chains, selection)
    submission, raw = records_for(item, chosen, backend)
    raw.update(extra)
    return submission, raw


def answer(recipe: Recipe, engine: Engine, pending: list[Item], paths: RunPaths,
           on_batch: Callable[[int], None] | None, failed: dict[str, str], swaps: dict[str, Item] | None = None) -> int:
    by_id = {item.id: item for item in pending}
    context = engine.context_length
    max_token_chars = max(map(len, engine.tokenizer.get_vocab())) if context else 0
    chunks = [pending[start:start + AUDIO_CHUNK] for start in range(0, len(pending), AUDIO_CHUNK)]
    written = 0
    sc = recipe.infer.self_consistency
    sampling = run_sampling(engine.sampling, recipe)
    chains = None if sc is None else ChainCollector(sc.n)
    expand = (lambda requests: requests) if sc is None else (lambda requests: chain_requests(requests, sc.n))
    # The next chunk's clips decode in a thread while this chunk generates.
    with progress(len(pending), "infer", unit="item") as bar, ThreadPoolExecutor(1) as decoder:
        ahead = decoder.submit(build_requests, recipe, engine, chunks[0], failed, swaps)
        for n in range(len(chunks)):
            requests = ahead.result()
            if n + 1 < len(chunks):
                ahead = decoder.submit(build_requests, recipe, engine, chunks[n + 1], failed, swaps)
            fitting = []
            for request in requests:
                reason = prompt_too_long(request, engine.tokenizer, context, max_token_chars)
                if reason is None:
                    fitting.append(request)
                elif recipe.infer.fail_fast:
                    raise DataError(f"{by_id[request.id].where} (id={request.id}): {reason}")
                else:
                    failed[request.id] = f"{by_id[request.id].where} (id={request.id}): {reason}"
            bar.update(len(chunks[n]) - len(fitting))  # failed items are done with too
            for batch in engine.generate_batches(expand(fitting), sampling) if fitting else ():
                pairs = ([records_for(by_id[g.id], g, engine.name) for g in batch] if chains is None
                         else [voted_records(by_id[item_id], item_chains, engine.name, sc.selection)
                               for item_id, item_chains in chains.add(batch)])
                if not pairs:
                    continue
                append_records(paths.raw, [raw for _, raw in pairs])  # raw first: resume trusts the submission
                append_records(paths.submission, [sub for sub, _ in pairs])
                written += len(pairs)
                tokens = sum(raw["n_generated_tokens"] for _, raw in pairs)
                bar.set_postfix(tok_s=f"{tokens / max(sum(raw['seconds'] for _, raw in pairs), 1e-9):.1f}")
                bar.update(len(pairs))
                if on_batch is not None:
                    on_batch(written)
    if failed:
        print(f"infer: {len(failed)} item(s) failed and were not answered (re-run to retry them):", file=sys.stderr)
        for reason in failed.values():
            print(f"  {reason}", file=sys.stderr)
    return written


def finish(recipe: Recipe, paths: RunPaths, every: list[Item], items: list[Item], engine: dict | None,
           sampling: dict | None, written: int, seconds: float, failed: dict[str, str]) -> dict:
    """Order the files once `items` are all done; write and return the run summary."""
    raw_records = read_records(paths.raw)
    complete = {item.id for item in items} <= {r["id"] for r in raw_records}
    if complete:  # put both files in metadata order
        order = {item.id: n for n, item in enumerate(every)}
        write_records(paths.raw, sorted(raw_records, key=lambda r: order[r["id"]]))
        write_records(paths.submission, sorted(read_records(paths.submission), key=lambda r: order[r["id"]]))
    summary = {
        "output": str(paths.submission), "meta": recipe.infer.meta, "model": recipe.model.path,
        "adapter": recipe.infer.adapter, "prompt_style": recipe.model.prompt_style,
        "audio_ablation": recipe.infer.audio_ablation, "complete": complete,
        "engine": engine, "sampling": sampling, "parse_policy": POLICY,
        # opt-in inference-time scaling, stated where the audit's compliance check reads it
        "self_consistency": recipe.infer.self_consistency.model_dump() if recipe.infer.self_consistency else None,
        "mata": recipe.infer.mata.model_dump() if recipe.infer.mata else None,
        "this_invocation": {"answered": written, "wall_seconds": round(seconds, 3)},
        "totals": {**totals(raw_records, len(items)), "failed": len(failed)},
        "failed": [{"id": rid, "error": reason} for rid, reason in failed.items()],
    }
    if engine is not None or failed or not paths.run.is_file():  # nothing left to do: keep the last settings
        paths.run.write_text(json.dumps(summary, indent=2) + "\n")
    t = summary["totals"]
    print(f"infer: {t['done']}/{t['items']} done -> {paths.submission} | truncated {t['truncated']}, "
          f"unmatched {t['unmatched']}, failed {t['failed']}, thinking budget fired {t['thinking_budget_fired']}, thinking cut "
          f"{t['thinking_cut']}, {t['generated_tokens_per_s']} generated tok/s")
    return summary


def shard_output(output: str | Path, rank: int) -> Path:
    out = Path(output)
    return out.with_name(f"{out.name.removesuffix('.jsonl')}.dp{rank}.jsonl")


def fold_shards(paths: RunPaths, known: set[str], size: int) -> dict[str, str]:
    """Move the workers' finished records into the main files, then delete the workers' files; returns
    the items the workers recorded as failed. A worker still writing its files (an orphan of a killed
    run that has not noticed yet) holds their lock: that is an error naming it."""
    done = resume_state(paths, known)
    failed: dict[str, str] = {}
    for rank in range(size):
        shard = RunPaths.beside(shard_output(paths.submission, rank))
        with output_lock(shard.submission):
            subs = [r for r in read_records(shard.submission) if r["id"] not in done]
            ids = {r["id"] for r in subs}
            append_records(paths.raw, [r for r in read_records(shard.raw) if r["id"] in ids])
            append_records(paths.submission, subs)
            done |= ids
            if shard.run.is_file():
                failed |= {f["id"]: f["error"] for f in json.loads(shard.run.read_text()).get("failed", [])}
            for path in (shard.submission, shard.raw, shard.run, shard.recipe):
                path.unlink(missing_ok=True)
    return failed


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
    with output_lock(paths.submission):
        check_resumable(paths, recipe)
        save_recipe(recipe, paths.recipe)
        fold_shards(paths, known, cfg.data_parallel_size)  # leftovers of an interrupted run
        started = time.perf_counter()
        before = len(read_records(paths.submission))
        workers = []
        for rank in range(cfg.data_parallel_size):
            env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
            devices = worker_devices(rank, cfg.tensor_parallel_size)
            if devices is not None:
                env["CUDA_VISIBLE_DEVICES"] = devices
            log = shard_output(cfg.output, rank).with_suffix(".log")
            command = [sys.executable, "-m", "infer", "run", str(paths.recipe), f"infer.data_parallel_rank={rank}"]
            with log.open("w") as handle:
                workers.append((rank, log, subprocess.Popen(command, env=env, stdout=handle, stderr=subprocess.STDOUT)))
        print(f"infer: {len(workers)} data-parallel workers, logs in {paths.submission.parent}/*.dp*.log")
        crashed = [(rank, log) for rank, log, process in workers if process.wait() != 0]
        failed = fold_shards(paths, known, cfg.data_parallel_size)
        written = len(read_records(paths.submission)) - before
        sampling = run_sampling(SamplingConfig.resolve(cfg, checkpoint_generation_defaults(recipe.model.path)), recipe).to_dict()
        engine = {"backend": cfg.backend, "data_parallel_size": cfg.data_parallel_size,
                  "tensor_parallel_size": cfg.tensor_parallel_size, "batch_size": cfg.batch_size}
        summary = finish(recipe, paths, every, items, engine, sampling, written, time.perf_counter() - started, failed)
    if crashed:
        raise RuntimeError("data-parallel workers failed (finished work is kept; re-run to resume): "
                           + ", ".join(f"rank {rank}, see {log}" for rank, log in crashed))
    return summary
