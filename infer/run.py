"""`infer run RECIPE`: answer every benchmark item, writing the submission as batches finish.

Outputs, beside `infer.output` (say `runs/x/submission.jsonl`):
- `submission.jsonl`: `{"id", "thinking_prediction", "answer_prediction"}` per line, the challenge format;
- `submission.raw.jsonl`: per item the raw output, the answer text, the rule that matched it,
  truncation/clipping flags, token counts and seconds;
- `submission.run.json`: decoding settings, backend, parsing policy and totals;
- `submission.recipe.yaml`: the resolved recipe.

Both JSONL files are appended and flushed per batch. A re-run with the same output skips the ids
already in the submission (a torn last line from a kill is dropped and redone), so no finished work
is lost and no id is written twice. When every item is done, both files are rewritten in the
order of the metadata file.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from infer import qwen_omni as qo
from infer.data import DataError, Item, load_items
from infer.engine import Engine, Generation, Request, load_engine
from infer.parse import POLICY, parse_output
from infer.recipe import Recipe, save_recipe
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
        "thinking_clipped": parsed.thinking_clipped, "n_prompt_tokens": generation.n_prompt_tokens,
        "n_generated_tokens": generation.n_generated_tokens, "seconds": round(generation.seconds, 4),
        "backend": backend,
    }
    return submission, raw


def resume_state(paths: RunPaths, items: list[Item]) -> set[str]:
    """Ids already answered; the raw file is cut back to them (it is written before the submission)."""
    known = {item.id for item in items}
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
        "thinking_clipped": sum(r["thinking_clipped"] for r in raw_records),
        "rules": dict(sorted(rules.items())),
        "prompt_tokens": sum(r["n_prompt_tokens"] for r in raw_records),
        "generated_tokens": generated,
        "generation_seconds": round(seconds, 3),
        "samples_per_s": round(len(raw_records) / seconds, 3) if seconds else None,
        "generated_tokens_per_s": round(generated / seconds, 2) if seconds else None,
    }


def run(recipe: Recipe, engine: Engine | None = None, on_batch: Callable[[int], None] | None = None) -> dict:
    """Answer the pending items of `recipe.infer.meta`; returns the run summary (also written to disk).

    `engine`: reuse an already loaded one (tests, benchmarks); `on_batch(n_written)` is called after
    each batch is on disk.
    """
    cfg = recipe.infer
    items = load_items(cfg.meta, cfg.audio_root, check_audio=True)
    if cfg.limit is not None:
        items = items[: cfg.limit]
    paths = RunPaths.beside(cfg.output)
    paths.submission.parent.mkdir(parents=True, exist_ok=True)
    save_recipe(recipe, paths.recipe)
    done = resume_state(paths, items)
    pending = [item for item in items if item.id not in done]
    print(f"infer: {len(items)} items, {len(done)} already in {paths.submission}, {len(pending)} to answer")
    engine = engine or (load_engine(recipe) if pending else None)
    by_id = {item.id: item for item in items}
    started = time.perf_counter()
    written = 0
    with tqdm(total=len(pending), desc="infer", unit="item", disable=not pending) as progress:
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
    raw_records = read_records(paths.raw)
    if len(raw_records) == len(items):  # complete: put both files in metadata order
        order = {item.id: n for n, item in enumerate(items)}
        write_records(paths.raw, sorted(raw_records, key=lambda r: order[r["id"]]))
        write_records(paths.submission, sorted(read_records(paths.submission), key=lambda r: order[r["id"]]))
    summary = {
        "output": str(paths.submission), "meta": cfg.meta, "model": recipe.model.path, "adapter": cfg.adapter,
        "prompt_style": recipe.model.prompt_style, "complete": len(raw_records) == len(items),
        "engine": engine.describe() if engine else None,
        "sampling": engine.sampling.to_dict() if engine else None,
        "parse_policy": POLICY,
        "this_invocation": {"answered": written, "wall_seconds": round(time.perf_counter() - started, 3)},
        "totals": totals(raw_records, len(items)),
    }
    if engine is not None or not paths.run.is_file():
        paths.run.write_text(json.dumps(summary, indent=2) + "\n")
    t = summary["totals"]
    print(f"infer: {t['done']}/{t['items']} done -> {paths.submission} | truncated {t['truncated']}, "
          f"unmatched {t['unmatched']}, {t['generated_tokens_per_s']} generated tok/s")
    return summary
