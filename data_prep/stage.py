"""The stage framework every Cogito-Pipe stage runs on: sharded, resumable, counted.

A stage maps each input record (JSONL, unique `id`s) to a list of output records or to a
rejection reason (a short string such as "unreadable_clip"):

    def probe(record: dict) -> list[dict] | str: ...
    report = run_stage("collect", each(probe), "work/candidates.jsonl", "work", shard=(0, 4))

Layout under the work dir, for a stage called NAME:

    NAME.parts/shard-IIIII-of-NNNNN.jsonl   journal: one line per finished input record,
                                            {"id", "out": [...]} or {"id", "rejected": reason}
    NAME.parts/shard-IIIII-of-NNNNN.report.json
    NAME.jsonl                              the output, in input order, once every shard is done
    NAME.report.json                        counts in/out/resumed/rejected by reason, seconds

A record's outcome may be wrapped in `Counted(outcome, counts)` to tally events below the record
level (retries, one of a clip's three questions dropped): the journal keeps them beside the
outcome ({"id", "out", "counts"}) and the reports sum them under "counts".

Each process handles the input records whose id hashes to its shard (`--shard i/n`), so several
processes or machines on a shared file system split the work without coordinating. Journal
lines are appended and flushed as batches finish; after a kill the stage resumes by skipping the
ids any journal already holds (a torn last line is cut off). The process that finds all input
ids journaled merges them into NAME.jsonl; an output id seen twice is dropped and counted, so
the output never holds duplicates.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Union

from core.items import DataError, read_jsonl
from core.progress import progress

Outcome = Union[list[dict], str]  # output records, or the reason the input was rejected


@dataclass(frozen=True)
class Counted:
    """An outcome plus event tallies for the stage report, e.g. {"malformed_reply:not_json": 2}."""

    outcome: Outcome
    counts: dict[str, int]


BatchFn = Callable[[list[dict]], list[Union[Outcome, Counted]]]


def each(fn: Callable[[dict], Outcome]) -> BatchFn:
    """Turn a per-record function into the batch function `run_stage` calls."""

    def batch(records: list[dict]) -> list[Outcome]:
        return [fn(record) for record in records]

    return batch


def parse_shard(text: str | tuple[int, int]) -> tuple[int, int]:
    """"i/n" -> (i, n) with 0 <= i < n."""
    if isinstance(text, tuple):
        index, count = text
    else:
        try:
            index, count = (int(x) for x in str(text).split("/"))
        except ValueError:
            raise ValueError(f"shard {text!r}: expected i/n, e.g. 0/4") from None
    if not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= i < n")
    return index, count


def shard_of(record_id: str, count: int) -> int:
    """Stable across runs, machines and input order: a hash of the id, not its position."""
    return int.from_bytes(hashlib.sha1(record_id.encode("utf-8")).digest()[:8], "big") % count


def stage_paths(work_dir: str | Path, name: str) -> dict[str, Path]:
    work = Path(work_dir)
    return {"output": work / f"{name}.jsonl", "report": work / f"{name}.report.json", "parts": work / f"{name}.parts"}


def finished_output(work_dir: str | Path, name: str) -> Path:
    """The merged output of stage `name`, which the next stage reads; an error if it is not there yet."""
    output = stage_paths(work_dir, name)["output"]
    if not output.is_file():
        raise DataError(f"{output}: not found; run `python -m data_prep {name}` first")
    return output


def _part_path(parts: Path, index: int, count: int) -> Path:
    return parts / f"shard-{index:05d}-of-{count:05d}.jsonl"


def _repair_torn_tail(path: Path, chunk: int = 1 << 16) -> None:
    """Cut a journal back to its last complete line (a kill can leave half a line behind)."""
    with path.open("r+b") as handle:
        size = handle.seek(0, os.SEEK_END)
        end = size
        while end > 0:
            start = max(0, end - chunk)
            handle.seek(start)
            block = handle.read(end - start)
            if (newline := block.rfind(b"\n")) >= 0:
                keep = start + newline + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            handle.truncate(keep)


def _journal(parts: Path) -> Iterator[tuple[Path, int, dict]]:
    """(part file, byte offset, entry) for every complete line of every journal of the stage.

    Read-only: another shard may be appending to its journal right now, so an unfinished last
    line is passed over here and only ever cut off by the journal's own shard (`run_stage`).
    """
    if not parts.is_dir():
        return
    for path in sorted(parts.glob("shard-*.jsonl")):
        with path.open("rb") as handle:
            offset = 0
            for line in handle:
                if not line.endswith(b"\n"):
                    break
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{path}: corrupt journal line at byte {offset}; remove the file to redo its shard") from None
                yield path, offset, entry
                offset += len(line)


def _input_ids(input_path: Path) -> list[str]:
    ids, first = [], {}
    for lineno, record in read_jsonl(input_path):
        rid = record.get("id")
        if not isinstance(rid, str) or not rid:
            raise DataError(f"{input_path}:{lineno}: id: missing or not a string")
        if rid in first:
            raise DataError(f"{input_path}:{lineno} (id={rid}): id: duplicate of line {first[rid]}")
        first[rid] = lineno
        ids.append(rid)
    return ids


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def run_stage(
    name: str,
    process: BatchFn,
    input_path: str | Path,
    work_dir: str | Path,
    shard: str | tuple[int, int] = (0, 1),
    batch_size: int = 1,
    extra_report: dict | None = None,
    show_progress: bool = True,
) -> dict:
    """Process this process's shard of `input_path`, then merge if every shard is done.

    Returns the merged report when the output was written, else this shard's report
    (`"complete": False`). `extra_report` is stored in both (e.g. collect's scan counts).
    """
    index, count = parse_shard(shard)
    input_path = Path(input_path)
    paths = stage_paths(work_dir, name)
    paths["parts"].mkdir(parents=True, exist_ok=True)
    part = _part_path(paths["parts"], index, count)
    if part.is_file():
        _repair_torn_tail(part)
    all_ids = _input_ids(input_path)
    mine = {rid for rid in all_ids if shard_of(rid, count) == index}
    done = {entry["id"] for _, _, entry in _journal(paths["parts"])}
    todo = mine - done

    shard_report_path = part.with_suffix(".report.json")
    previous = json.loads(shard_report_path.read_text()) if shard_report_path.is_file() else {}
    rejected: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    written = 0
    started = time.perf_counter()
    bar = progress(len(todo), f"{name} {index}/{count}", unit="rec", disable=not show_progress)
    with part.open("a", encoding="utf-8") as journal:
        batch: list[dict] = []

        def flush() -> None:
            nonlocal written
            outcomes = process(batch)
            if len(outcomes) != len(batch):
                raise RuntimeError(f"stage {name}: {len(batch)} records in, {len(outcomes)} outcomes back")
            for record, outcome in zip(batch, outcomes):
                tally = {}
                if isinstance(outcome, Counted):
                    outcome, tally = outcome.outcome, {k: v for k, v in outcome.counts.items() if v}
                    counts.update(tally)
                if isinstance(outcome, str):
                    rejected[outcome] += 1
                    entry = {"id": record["id"], "rejected": outcome}
                else:
                    written += len(outcome)
                    entry = {"id": record["id"], "out": outcome}
                if tally:
                    entry["counts"] = tally
                journal.write(json.dumps(entry, ensure_ascii=False) + "\n")
            journal.flush()
            bar.update(len(batch))
            bar.set_postfix(out=written, rejected=sum(rejected.values()))
            batch.clear()

        if todo:
            for _, record in read_jsonl(input_path):
                if record["id"] in todo:
                    batch.append(record)
                    if len(batch) >= batch_size:
                        flush()
            if batch:
                flush()
    bar.close()
    seconds = time.perf_counter() - started
    shard_report = {
        "stage": name, "shard": f"{index}/{count}", "in": len(mine), "resumed": len(mine & done),
        "processed": len(todo), "out": written, "rejected": dict(rejected), "counts": dict(counts),
        "seconds": round(seconds + previous.get("seconds", 0.0), 3),
        "records_per_second": round(len(todo) / seconds, 2) if seconds > 0 and todo else None,
        "complete": True, **(extra_report or {}),
    }
    _write_json(shard_report_path, shard_report)
    merged = merge_stage(name, input_path, work_dir, all_ids, extra_report)
    return merged if merged is not None else {**shard_report, "complete": False}


def merge_stage(
    name: str, input_path: str | Path, work_dir: str | Path, all_ids: list[str] | None = None, extra_report: dict | None = None
) -> dict | None:
    """Write NAME.jsonl and NAME.report.json when every input id is journaled; else return None."""
    input_path = Path(input_path)
    paths = stage_paths(work_dir, name)
    all_ids = all_ids if all_ids is not None else _input_ids(input_path)
    where: dict[str, tuple[Path, int]] = {}
    for path, offset, entry in _journal(paths["parts"]):
        where.setdefault(entry["id"], (path, offset))  # a second journal of the same id is ignored
    if any(rid not in where for rid in all_ids):
        return None

    rejected: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    seen_out: set[str] = set()
    written = 0
    handles: dict[Path, Any] = {}
    tmp = paths["output"].with_name(f".{paths['output'].name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as out:
            for rid in all_ids:
                path, offset = where[rid]
                handle = handles.setdefault(path, path.open("rb"))
                handle.seek(offset)
                entry = json.loads(handle.readline())
                counts.update(entry.get("counts", {}))
                if "rejected" in entry:
                    rejected[entry["rejected"]] += 1
                    continue
                for record in entry["out"]:
                    if record["id"] in seen_out:
                        rejected["duplicate_id"] += 1
                        continue
                    seen_out.add(record["id"])
                    out.write(json.dumps(record, ensure_ascii=False) + "\n")
                    written += 1
    finally:
        for handle in handles.values():
            handle.close()
    os.replace(tmp, paths["output"])

    shard_reports = [json.loads(p.read_text()) for p in sorted(paths["parts"].glob("shard-*.report.json"))]
    report = {
        "stage": name, "input": str(input_path), "output": str(paths["output"]), "in": len(all_ids), "out": written,
        "rejected": dict(sorted(rejected.items())), "counts": dict(sorted(counts.items())),
        "seconds": round(sum(r.get("seconds", 0.0) for r in shard_reports), 3),
        "shards": [r["shard"] for r in shard_reports], "complete": True, **(extra_report or {}),
    }
    _write_json(paths["report"], report)
    return report


def read_reports(work_dir: str | Path) -> dict[str, dict]:
    """Every merged stage report in the work dir, by stage name."""
    return {
        path.name[: -len(".report.json")]: json.loads(path.read_text())
        for path in sorted(Path(work_dir).glob("*.report.json"))
    }
