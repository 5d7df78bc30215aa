"""The training-data cache: every SFT record rendered, tokenised and measured once, memory-mapped by every rank.

    table = cached_records("data/verify.jsonl", None, processor, "baseline", 30.0, "runs/x/data_cache", workers=None)
    table["length"] ...  # a `datasets.Dataset` over Arrow files on disk: rows are read, never all loaded

What a row holds: the record's id, line, resolved audio path, question, choices, answer and thinking;
the rendered prompt (`core.qwen_omni.render_prompt`); `audio_samples`, the whole clip's length at
16 kHz (from the file header: `Item.audio_samples`); and `length`, the tokens of the prompt with its
audio (cut to `data.max_audio_seconds`) expanded plus the target, exactly as the collator tokenises them.
Token ids are counted, never kept: the collator tokenises each batch itself.

Key. One folder per data file, named after the hash of everything its rows depend on: the file's
bytes (blake2b, ~1 GB/s), the audio root, the tokenizer (its full serialisation, special tokens and
chat template, and the transformers/tokenizers versions), the prompt style, `data.max_audio_seconds`,
FORMAT_VERSION (bump it when this module's rows change) and what `core.qwen_omni`'s rules give on
fixed probes (a rendered prompt and target, audio token counts of probe clip lengths), so a change
to the chat format or the audio frame rule there rebuilds the cache without anyone bumping a version.
`data.max_length` and `max_samples` are not in the key: they select rows at load time from the
`length` column, so changing them costs nothing. The audio files are named, not hashed (that would
read every clip on every start): a clip rewritten in place with another length needs the folder
deleted.

Build. The JSONL is cut at line boundaries into byte ranges; `data.cache_workers` processes
(default: every CPU this process may use) each parse, validate, measure and tokenise their ranges and
write one Arrow file per range, in file order, so errors still name `file:line (id=...): field`.
A process pool over byte ranges rather than `datasets.map(num_proc)`: map needs the records in an
Arrow table first (every line in the parent's memory, ~1.4 GB at 545k records) and pickles the
tokenizer to each worker; here a worker reads only its own range and inherits the tokenizer by fork.

Sharing. The first process to find the folder missing takes the lock DIR/<key>.lock (core.locks), builds
into DIR/<key>.tmp-<pid> and renames it into place (atomic); every other process (the other ranks of
a node, or of every node when DIR is on shared storage) blocks on the lock, then memory-maps the
finished folder. A build that crashed leaves a tmp folder that the next builder removes.

Integrity. info.json lists every part with its rows, bytes and blake2b. Every open checks the folder
against it (the parts present, their sizes and hashes: the cost of one read, like hashing the JSONL
for the key) and the rows loaded against `records`; a part missing, truncated, altered or added is
logged by name and the folder rebuilt under the lock, never trained on short or altered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import socket
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import pyarrow as pa

from core import qwen_omni as qo
from core.items import DataError, Item, check_item, parse_item, parse_line
from core.locks import file_lock

FORMAT_VERSION = 2  # 2: info.json lists the parts (rows, bytes, blake2b), checked on every open
INFO = "info.json"  # written last into the folder: a folder with it is complete
SCHEMA = pa.schema([
    ("id", pa.string()), ("line", pa.int64()), ("audio_path", pa.string()), ("question", pa.string()),
    ("choices", pa.list_(pa.string())), ("answer", pa.string()), ("thinking", pa.string()),
    ("prompt", pa.string()), ("audio_samples", pa.int64()), ("length", pa.int32()),
])
BATCH_RECORDS = 1024  # records tokenised per call and per Arrow record batch
# bytes of the JSONL per task: ~4 tasks per worker (for balance and progress), within these bounds
MIN_RANGE_BYTES, MAX_RANGE_BYTES = 1 << 20, 32 << 20
# clip lengths (samples at 16 kHz) whose audio token counts go into the key: around a hop, a second, 10 s and 30 s
PROBE_SAMPLES = (1, 159, 160, 161, 1_599, 1_600, 15_999, 16_000, 16_001, 24_000, 159_999, 160_000, 480_000, 480_001)


def token_lengths(processor: qo.OmniProcessor, prompts: Sequence[str], targets: Sequence[str], samples: Sequence[int]) -> list[int]:
    """Tokens of each prompt (its audio placeholder expanded for a clip of `samples`) plus its target."""
    prompt_counts, target_counts = token_counts(processor.tokenizer, prompts), token_counts(processor.tokenizer, targets)
    return [processor.expanded_token_count(p, qo.feature_frames(n)) + t for p, n, t in zip(prompt_counts, samples, target_counts)]


def token_counts(tokenizer, texts: Sequence[str]) -> list[int]:
    """len(tokenizer(text, add_special_tokens=False)["input_ids"]) of each text, in one batched call.

    A fast tokenizer's own `encode_batch_fast` gives the same ids (the wrapper calls that tokenizer)
    without character offsets or Python lists: ~2x faster, and tokenising is most of a build.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation or backend.padding:  # the wrapper switches those off per call
        return [len(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]
    return [len(encoding) for encoding in backend.encode_batch_fast(list(texts), add_special_tokens=False)]


def tokenizer_digest(tokenizer) -> str:
    """Hash of everything that decides how `tokenizer` renders and splits text."""
    import tokenizers
    import transformers

    backend = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) \
        else json.dumps(sorted(tokenizer.get_vocab().items()))
    parts = [type(tokenizer).__name__, backend, tokenizer.chat_template or "", json.dumps(tokenizer.special_tokens_map, sort_keys=True),
             transformers.__version__, tokenizers.__version__]
    return _digest("\0".join(parts).encode())


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def cache_key(data_digest: str, audio_root: Path, processor: qo.OmniProcessor, prompt_style: str,
              max_audio_seconds: float | None) -> tuple[str, dict]:
    """(folder name, what it was made of) for one data file's rows."""
    probe = qo.render_prompt(processor.tokenizer, "Which tone is higher?", ["the first", "the second"], prompt_style)
    description = {
        "format_version": FORMAT_VERSION,
        "data_blake2b": data_digest,
        "audio_root": str(audio_root),
        "tokenizer": tokenizer_digest(processor.tokenizer),
        "prompt_style": prompt_style,
        "max_audio_seconds": max_audio_seconds,
        "probe_prompt": probe,
        "probe_target": qo.render_target(probe, "Two tones; the second is higher.", "the second"),
        "probe_audio_tokens": [qo.audio_token_count(qo.feature_frames(n)) for n in PROBE_SAMPLES],
    }
    return _digest(json.dumps(description, sort_keys=True).encode()), description


def scan(path: Path, range_bytes: int) -> tuple[str, list[tuple[int, int, int]]]:
    """(blake2b of the file, byte ranges `(start, end, first line number)` cut at line ends), in one read."""
    hasher = hashlib.blake2b(digest_size=16)
    ranges, start, start_line, newlines, position = [], 0, 1, 0, 0
    with path.open("rb") as handle:
        while block := handle.read(min(range_bytes, 4 << 20)):
            hasher.update(block)
            cut = block.rfind(b"\n") if position + len(block) - start >= range_bytes else -1
            if cut < 0:
                newlines += block.count(b"\n")
            else:
                ranges.append((start, position + cut + 1, start_line))
                start_line += newlines + block.count(b"\n", 0, cut + 1)
                newlines, start = block.count(b"\n", cut + 1), position + cut + 1
            position += len(block)
    if start < position:
        ranges.append((start, position, start_line))
    return hasher.hexdigest(), ranges


@dataclass
class RangeRenderer:
    """Parses, validates, measures and tokenises one byte range of a JSONL into an Arrow file."""

    processor: qo.OmniProcessor
    audio_root: Path
    prompt_style: str
    max_audio_seconds: float | None

    def __call__(self, task: tuple[str, int, int, int, str]) -> int:
        path, start, end, first_line, out = task
        with open(path, "rb") as handle:
            handle.seek(start)
            data = handle.read(end - start)
        items = []
        for offset, line in enumerate(data.split(b"\n")):
            if line.strip():
                where = f"{path}:{first_line + offset}"
                item = parse_item(parse_line(line, where), where, self.audio_root)
                check_item(item, check_audio=True, require_thinking=True)
                items.append(item)
        with pa.OSFile(out, "wb") as sink, pa.ipc.new_stream(sink, SCHEMA) as writer:
            for i in range(0, len(items), BATCH_RECORDS):
                writer.write_batch(self.rows(items[i : i + BATCH_RECORDS]))
        return len(items)

    def rows(self, items: list[Item]) -> pa.RecordBatch:
        prompts, _, samples, lengths = render(items, self.processor, self.prompt_style, self.max_audio_seconds)
        return pa.RecordBatch.from_pydict({
            "id": [item.id for item in items], "line": [int(item.where.rsplit(":", 1)[1]) for item in items],
            "audio_path": [str(item.audio_path) for item in items], "question": [item.question for item in items],
            "choices": [list(item.choices) for item in items], "answer": [item.answer for item in items],
            "thinking": [item.thinking for item in items], "prompt": prompts, "audio_samples": samples, "length": lengths,
        }, schema=SCHEMA)


def sample_limit(max_audio_seconds: float | None) -> int:
    """Samples at 16 kHz a clip keeps under `data.max_audio_seconds` (None: whole clips, no limit)."""
    return sys.maxsize if max_audio_seconds is None else int(max_audio_seconds * qo.SAMPLE_RATE)


def render(items: Sequence[Item], processor: qo.OmniProcessor, prompt_style: str, max_audio_seconds: float | None):
    """(prompts, targets, whole-clip samples at 16 kHz, token lengths) of SFT items: what the cache holds of each."""
    prompts = [qo.render_prompt(processor.tokenizer, item.question, item.choices, prompt_style) for item in items]
    targets = [qo.render_target(prompt, item.thinking, item.answer) for prompt, item in zip(prompts, items)]
    samples = [item.audio_samples() for item in items]  # whole clips, from the headers
    limit = sample_limit(max_audio_seconds)
    return prompts, targets, samples, token_lengths(processor, prompts, targets, [min(n, limit) for n in samples])


_worker_renderer: RangeRenderer | None = None


def _init_worker(renderer: RangeRenderer) -> None:
    global _worker_renderer
    import torch

    # One thread per worker: the workers already fill the cores, and a forked OpenMP pool can hang.
    torch.set_num_threads(1)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_renderer = renderer


def _render_in_worker(task) -> int:
    return _worker_renderer(task)


def cache_workers(requested: int | None) -> int:
    return requested or len(os.sched_getaffinity(0))


def cached_records(
    path: str | Path,
    audio_root: str | Path | None,
    processor: qo.OmniProcessor,
    prompt_style: str,
    max_audio_seconds: float | None,
    root: str | Path,
    workers: int | None = None,
    log: Callable[[str], object] | None = None,
):
    """The cached rows of one SFT JSONL (a memory-mapped `datasets.Dataset`), built first if missing.

    `log` gets the build's progress and throughput, and a line when this process waits for another's build
    (default: standard error, looked up when called, so a replaced stream is the one written to)."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    workers = cache_workers(workers)
    audio_root = (Path(audio_root) if audio_root is not None else path.parent).resolve()
    digest, ranges = scan(path, max(MIN_RANGE_BYTES, min(MAX_RANGE_BYTES, path.stat().st_size // (4 * workers) + 1)))
    key, description = cache_key(digest, audio_root, processor, prompt_style, max_audio_seconds)
    folder = Path(root) / key
    if not (folder / INFO).is_file() or damage(folder):
        waiting = lambda: log(f"data cache: {path}: waiting for another process to build {folder}")
        with file_lock(Path(root) / f"{key}.lock", on_wait=waiting):
            if (folder / INFO).is_file() and (problems := damage(folder)):  # checked again: another may have rebuilt it
                log(f"data cache: {folder} is damaged ({'; '.join(problems)}): rebuilding it")
                os.rename(folder, folder.with_name(f"{folder.name}.tmp-damaged-{os.getpid()}"))  # removed by build, with crashed builds
            if not (folder / INFO).is_file():
                renderer = RangeRenderer(processor, audio_root, prompt_style, max_audio_seconds)
                build(path, ranges, folder, renderer, workers, {**description, "data_file": str(path)}, log)
    return load(folder)


def damage(folder: Path) -> list[str]:
    """How the folder's parts differ from the manifest in its info.json, one line per part; empty when intact."""
    try:
        manifest = {part["name"]: part for part in json.loads((folder / INFO).read_text())["parts"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        return [f"{folder / INFO}: no readable parts manifest ({type(err).__name__}: {err})"]
    present = {part.name for part in folder.glob("part-*.arrow")}
    problems = [f"{folder / name}: missing" for name in sorted(manifest.keys() - present)]
    problems += [f"{folder / name}: not in the manifest" for name in sorted(present - manifest.keys())]
    for name in sorted(manifest.keys() & present):
        expected = manifest[name]
        try:
            size = (folder / name).stat().st_size
            if size != expected["bytes"]:
                problems.append(f"{folder / name}: {size:,} bytes, the manifest says {expected['bytes']:,}")
            elif _file_digest(folder / name) != expected["blake2b"]:
                problems.append(f"{folder / name}: content differs from the manifest (blake2b)")
        except OSError as err:  # e.g. removed by a process rebuilding the folder right now
            problems.append(f"{folder / name}: unreadable ({err.strerror or err})")
    return problems


def _file_digest(path: Path) -> str:
    hasher = hashlib.blake2b(digest_size=16)
    with path.open("rb") as handle:
        while block := handle.read(4 << 20):
            hasher.update(block)
    return hasher.hexdigest()


def build(path: Path, ranges: list[tuple[int, int, int]], folder: Path, renderer: RangeRenderer, workers: int, description: dict,
          log) -> None:
    """Render every range into DIR/<key>.tmp-<pid>/part-NNNNN.arrow, check ids, then rename it to `folder`."""
    for stale in folder.parent.glob(f"{folder.name}.tmp-*"):  # a crashed build's; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    tmp.mkdir(parents=True)
    tasks = [(str(path), start, end, line, str(tmp / f"part-{i:05d}.arrow")) for i, (start, end, line) in enumerate(ranges)]
    workers = min(workers, len(tasks)) or 1
    log(f"data cache: {path}: building {folder} ({sum(e - s for s, e, _ in ranges) / 2**20:.0f} MiB, "
        f"{len(tasks)} ranges, {workers} process(es))")
    began = time.perf_counter()
    try:
        with contextlib.ExitStack() as stack:
            if workers == 1:
                results = map(renderer, tasks)
            else:
                # fork: the workers inherit the tokenizer instead of loading it again
                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork"),
                                           initializer=_init_worker, initargs=(renderer,))
                stack.callback(pool.shutdown, wait=True, cancel_futures=True)  # a bad record stops the rest
                results = pool.map(_render_in_worker, tasks)
            records, reported, parts = 0, 0, []
            for done, count in enumerate(results, 1):
                records += count
                parts.append(count)
                if done * 10 // len(tasks) > reported or done == len(tasks):
                    reported = done * 10 // len(tasks)
                    seconds = time.perf_counter() - began
                    log(f"data cache: {path}: {done}/{len(tasks)} ranges, {records:,} records, {records / seconds:,.0f} records/s")
        if not records:
            raise DataError(f"{path}: no records")
        _check_unique_ids(path, load(tmp))
        seconds = time.perf_counter() - began
        parts = [{"name": Path(task[-1]).name, "rows": rows, "bytes": Path(task[-1]).stat().st_size,
                  "blake2b": _file_digest(Path(task[-1]))} for task, rows in zip(tasks, parts)]
        info = {**description, "records": records, "parts": parts, "build_seconds": round(seconds, 2), "workers": workers,
                "built_by": {"host": socket.gethostname(), "pid": os.getpid()}}
        (tmp / INFO).write_text(json.dumps(info, indent=2))
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_unique_ids(path: Path, table) -> None:
    first_line: dict[str, int] = {}
    for rid, line in zip(table.data.column("id").to_pylist(), table.data.column("line").to_pylist()):
        if rid in first_line:
            raise DataError(f"{path}:{line} (id={rid}): id: duplicate of line {first_line[rid]}")
        first_line[rid] = line


def load(folder: Path):
    """The folder's Arrow files as one `datasets.Dataset`, memory-mapped (nothing is read until used).

    With an info.json (a finished folder), the rows must number its `records`."""
    from datasets import Dataset, concatenate_datasets

    tables = []
    for part in sorted(Path(folder).glob("part-*.arrow")):
        try:
            tables.append(Dataset.from_file(str(part)))
        except (OSError, pa.ArrowInvalid) as err:
            raise DataError(f"{part}: unreadable data-cache part ({err}); delete {folder} to rebuild it") from None
    table = concatenate_datasets(tables)
    info = Path(folder) / INFO
    if info.is_file() and len(table) != (records := json.loads(info.read_text())["records"]):
        raise DataError(f"{folder}: {len(table):,} rows, its {INFO} says {records:,}; delete the folder to rebuild it")
    return table
