"""Stage 1 of the Cogito-Pipe, collect: raw datasets -> one manifest of probed clips.

    python -m data_prep collect recipes/cogito_data.yaml [data_prep.shard=0/4 ...]

1. scan: every source's adapter (`data_prep.sources`) lists its clips from the metadata files;
   clips it cannot use (not downloaded, bad rows) are counted by reason.
2. mixture: `sample_mixture` draws each source's share (count, or ratio of `total`),
   deterministic from the seed and independent of the other sources -> collect.candidates.jsonl.
3. probe (a sharded, resumable stage): `soundfile.info` gives each clip's duration without
   decoding it; unreadable, empty, too short/long clips and clips that overlap the MMAR test set
   (see `data_prep.guard`) are rejected and counted -> collect.jsonl, the manifest.

A manifest record:
    {"id": "clotho-development-Birds", "audio_path": "/abs/path.wav", "duration": 21.3,
     "domain": "sound", "source": "clotho", "licence": "...", "sample_rate": 44100, "channels": 1,
     "metadata": {"captions": [...], ...}}
A shortfall (a source with fewer usable clips than its share) is reported, not redistributed.
"""

from __future__ import annotations

import inspect
import random
from collections import Counter
from pathlib import Path

import soundfile as sf

from core.items import DataError
from core.recipe import DataPrepConfig, SourceSpec
from data_prep.guard import ContaminationIndex
from data_prep.sources import Candidate, get_adapter
from data_prep.stage import each, run_stage
from infer.submission import write_records

STAGE = "collect"


def candidate_record(spec: SourceSpec, candidate: Candidate) -> dict:
    adapter = get_adapter(spec.name)
    return {
        "id": f"{spec.name}-{candidate.key}", "audio_path": str(candidate.audio_path.resolve()),
        "domain": candidate.domain or adapter.domain, "source": spec.name,
        "licence": spec.licence or candidate.licence or adapter.licence, "metadata": candidate.metadata,
    }


def scan_source(spec: SourceSpec) -> tuple[list[dict], Counter[str]]:
    """Every usable candidate of one source, in the adapter's order, and the skip counts."""
    adapter = get_adapter(spec.name)
    root = Path(spec.root)
    if not root.is_dir():
        raise DataError(f"source {spec.name}: root {root} is not a folder (download the dataset there; see the adapter's docstring)")
    try:
        inspect.signature(adapter.scan).bind(root, **spec.options)
    except TypeError as err:
        raise DataError(f"source {spec.name}: bad options {spec.options}: {err}") from None
    records, skipped, seen = [], Counter(), set()
    for item in adapter.scan(root, **spec.options):
        if isinstance(item, Candidate):
            record = candidate_record(spec, item)
            if record["id"] in seen:
                skipped["duplicate_id"] += 1
                continue
            seen.add(record["id"])
            records.append(record)
        else:
            skipped[item.reason] += 1
    return records, skipped


def allocate(specs: list[SourceSpec], available: dict[str, int], total: int | None) -> dict[str, int]:
    """Clips wanted per source: its count, ratio x total, or everything it has.

    Ratios use largest remainders, so ratios that sum to 1 ask for exactly `total` clips.
    """
    wanted = {s.name: s.count if s.count is not None else available[s.name] for s in specs if s.ratio is None}
    exact = {s.name: s.ratio * total for s in specs if s.ratio is not None}
    floors = {name: int(x) for name, x in exact.items()}
    left = round(sum(exact.values())) - sum(floors.values())
    for name in sorted(exact, key=lambda n: (floors[n] - exact[n], n))[:left]:
        floors[name] += 1
    return wanted | floors


def sample_mixture(pools: dict[str, list[dict]], specs: list[SourceSpec], total: int | None, seed: int) -> tuple[list[dict], dict]:
    """Draw each source's share from its pool; same seed, same pools -> same selection.

    Each source has its own random stream (seeded by seed and source name), so adding or
    resizing one source leaves the others' selections unchanged. Selected records keep their
    pool order.
    """
    wanted = allocate(specs, {name: len(pool) for name, pool in pools.items()}, total)
    chosen, summary = [], {}
    for spec in specs:
        pool = pools[spec.name]
        k = min(wanted[spec.name], len(pool))
        picks = sorted(random.Random(f"{seed}:{spec.name}").sample(range(len(pool)), k))
        chosen.extend(pool[i] for i in picks)
        summary[spec.name] = {"available": len(pool), "wanted": wanted[spec.name], "selected": k,
                              "shortfall": wanted[spec.name] - k}
    return chosen, summary


def make_probe(config: DataPrepConfig, guard: ContaminationIndex | None):
    """The per-clip function of the collect stage: header read, duration, bounds, MMAR overlap."""

    def probe(record: dict) -> list[dict] | str:
        try:
            info = sf.info(record["audio_path"])
        except (sf.LibsndfileError, RuntimeError, OSError):
            return "unreadable_clip"
        if info.frames <= 0 or info.samplerate <= 0:
            return "empty_clip"
        duration = info.frames / info.samplerate
        if duration < config.min_seconds:
            return "too_short"
        if config.max_seconds is not None and duration > config.max_seconds:
            return "too_long"
        if guard is not None and (overlaps := guard.check(record)):
            return f"mmar_overlap_{overlaps[0].split(':', 1)[0]}"
        return [{**record, "duration": round(duration, 3), "sample_rate": info.samplerate, "channels": info.channels}]

    return probe


def load_guard(config: DataPrepConfig) -> ContaminationIndex | None:
    if config.mmar_meta is None:
        return None
    if not Path(config.mmar_meta).is_file():
        raise DataError(f"data_prep.mmar_meta: {config.mmar_meta} not found (set it to null to run without the guard)")
    return ContaminationIndex.from_meta(config.mmar_meta, config.mmar_audio_root)


def collect(config: DataPrepConfig, show_progress: bool = True) -> dict:
    """Scan, sample and probe; returns the stage report (merged when every shard is done)."""
    if not config.sources:
        raise DataError("data_prep.sources is empty: name at least one dataset")
    work = Path(config.work_dir)
    pools, scan = {}, {}
    for spec in config.sources:
        pools[spec.name], skipped = scan_source(spec)
        scan[spec.name] = {"candidates": len(pools[spec.name]), "skipped": dict(sorted(skipped.items()))}
    chosen, mixture = sample_mixture(pools, config.sources, config.total, config.seed)
    candidates = work / f"{STAGE}.candidates.jsonl"
    write_records(candidates, chosen)  # atomic: shard processes write this same file at once
    guard = load_guard(config)
    extra = {
        "scan": scan, "mixture": mixture, "seed": config.seed, "total": config.total,
        "guard": {"meta": config.mmar_meta, "checks": guard.checks if guard else [], "mmar_audio_hashes": len(guard.audio) if guard else 0},
    }
    return run_stage(STAGE, each(make_probe(config, guard)), candidates, work, config.shard,
                     extra_report=extra, show_progress=show_progress)
