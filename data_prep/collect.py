"""Stage 1 of the Cogito-Pipe, collect: raw datasets -> one manifest of probed clips.

    python -m data_prep collect recipes/cogito_data.yaml [data_prep.shard=0/4 ...]

1. scan: every source's adapter (`data_prep.sources`) lists its clips from the metadata files;
   rows it cannot use (not downloaded, bad rows, off-pattern names, ...) are counted by reason.
   Damaged metadata rows (`BAD_ROW_REASONS`) are skipped up to `data_prep.max_bad_rows` per source;
   one more stops collect naming the file and line.
2. licence gate (`data_prep.licences`): each clip's licence text maps to an id (`licence_id`); a clip
   whose id is unknown or not accepted stops collect with counts per source and licence, or is
   dropped and counted (`data_prep.unaccepted: drop`).
3. dedup: one clip per audio content, across and within sources, the first in recipe order kept: the
   same file (CoVoST's English clip under each pair's key, MusicBench test_A/test_B) and identical
   bytes (a size match, then the SHA-256 of the first 64 KiB, then of the whole file: only clips of
   equal size are read). Removed clips are counted per source.
4. mixture: `sample_mixture` draws each source's share (count, or ratio of `total`),
   deterministic from the seed and independent of the other sources; with `data_prep.shortfall:
   redistribute` a ratio source's missing clips move to the ratio sources of its domain
   -> collect.candidates.jsonl.
5. probe (a sharded, resumable stage): `soundfile.info` gives each clip's duration without
   decoding it; unreadable, empty, too short clips, clips longer than `data.max_audio_seconds` and
   clips that overlap the MMAR test set (see `data_prep.guard`) are rejected and counted -> collect.jsonl,
   the manifest.

A manifest record:
    {"id": "clotho-development-Birds", "audio_path": "/abs/path.wav", "duration": 21.3,
     "domain": "sound", "source": "clotho", "licence": "...", "licence_id": "CC-BY-3.0", "sample_rate": 44100,
     "channels": 1, "metadata": {"captions": [...], ...}}
"""

from __future__ import annotations

import hashlib
import inspect
import random
from collections import Counter, defaultdict
from pathlib import Path

import soundfile as sf

from core.items import DataError
from core.recipe import DataPrepConfig, SourceSpec
from data_prep.guard import ContaminationIndex
from data_prep.sources import BAD_ROW_REASONS, Candidate, get_adapter, licence_id
from data_prep.stage import each, run_stage
from infer.submission import write_records

STAGE = "collect"


def candidate_record(spec: SourceSpec, candidate: Candidate) -> dict:
    adapter = get_adapter(spec.name)
    licence = spec.licence or candidate.licence or adapter.licence
    # the adapter's id stands for its own licence text only: a per-clip or recipe licence is read for its id
    ident = adapter.licence_id if licence == adapter.licence else licence_id(licence)
    return {
        "id": f"{spec.name}-{candidate.key}", "audio_path": str(candidate.audio_path.resolve()),
        "domain": candidate.domain or adapter.domain, "source": spec.name,
        "licence": licence, "licence_id": ident or "unknown", "metadata": candidate.metadata,
    }


def scan_source(spec: SourceSpec, max_bad_rows: int | None = None) -> tuple[list[dict], Counter[str]]:
    """Every usable candidate of one source, in the adapter's order, and the skip counts.

    More than `max_bad_rows` damaged metadata rows (BAD_ROW_REASONS) stop the scan with an error naming the last."""
    adapter = get_adapter(spec.name)
    root = Path(spec.root)
    if not root.is_dir():
        raise DataError(f"source {spec.name}: root {root} is not a folder (download the dataset there; see the adapter's docstring)")
    try:
        inspect.signature(adapter.scan).bind(root, **spec.options)
    except TypeError as err:
        raise DataError(f"source {spec.name}: bad options {spec.options}: {err}") from None
    records, skipped, seen, bad = [], Counter(), set(), 0
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
            bad += item.reason in BAD_ROW_REASONS
            if max_bad_rows is not None and bad > max_bad_rows:
                raise DataError(f"source {spec.name}: more than data_prep.max_bad_rows={max_bad_rows} damaged metadata rows "
                                f"({dict(skipped)}); the last: {item.where} ({item.reason})")
    return records, skipped


def licence_gate(pools: dict[str, list[dict]], accepted: list[str] | None, action: str) -> dict[str, dict[str, int]]:
    """Clips per source and licence id that the gate refuses (unknown, or not in `accepted`).

    action "error": any refusal stops collect with those counts; "drop": refused clips leave the pools."""
    if accepted is None:
        return {}
    refused: dict[str, dict[str, int]] = {}
    for name, pool in pools.items():
        counts = Counter(r["licence_id"] for r in pool if r["licence_id"] not in accepted)
        if counts:
            refused[name] = dict(sorted(counts.items()))
            pools[name] = [r for r in pool if r["licence_id"] in accepted]
    if refused and action == "error":
        lines = "; ".join(f"{name}: " + ", ".join(f"{ident} x{n}" for ident, n in counts.items()) for name, counts in refused.items())
        raise DataError(f"licence gate: clips whose licence is unknown or not in data_prep.licences: {lines} "
                        "(accept the id, set the source's `licence`, or data_prep.unaccepted=drop)")
    return refused


def _file_digest(path: str, limit: int | None = None) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if limit is not None:
            digest.update(handle.read(limit))
        else:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def dedup(pools: dict[str, list[dict]]) -> dict[str, dict]:
    """Keep one clip per audio content, across and within sources, the first in pool order (sources in
    recipe order); returns per source the clips removed and the sources that kept their twins.

    Same content: the same file, or identical bytes. Only files of equal size are read (the first 64 KiB
    hashed, then the whole file where those agree), so a scan does not read every clip."""
    order = [(name, i) for name, pool in pools.items() for i in range(len(pool))]
    by_size: dict[int, list[tuple[str, int]]] = defaultdict(list)
    key: dict[tuple[str, int], str] = {}
    for name, i in order:
        path = pools[name][i]["audio_path"]
        key[name, i] = path
        by_size[Path(path).stat().st_size].append((name, i))
    for group in by_size.values():
        paths = {key[g] for g in group}
        if len(paths) < 2:
            continue
        heads: dict[str, list[str]] = defaultdict(list)
        for path in sorted(paths):
            heads[_file_digest(path, 1 << 16)].append(path)
        for same_head in heads.values():
            if len(same_head) > 1:
                content = {path: _file_digest(path) for path in same_head}
                for g in group:
                    key[g] = content.get(key[g], key[g])
    owner: dict[str, str] = {}  # content key -> the source that keeps it
    removed: dict[str, dict] = {}
    for name in pools:
        unique = []
        for i, record in enumerate(pools[name]):
            if key[name, i] in owner:
                row = removed.setdefault(name, {"removed": 0, "kept_in": Counter()})
                row["removed"] += 1
                row["kept_in"][owner[key[name, i]]] += 1
            else:
                owner[key[name, i]] = name
                unique.append(record)
        pools[name] = unique
    return {name: {"removed": row["removed"], "kept_in": dict(sorted(row["kept_in"].items()))} for name, row in removed.items()}


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


def redistribute(specs: list[SourceSpec], wanted: dict[str, int], available: dict[str, int],
                 domains: dict[str, str]) -> dict[str, int]:
    """Move the clips ratio sources lack to the ratio sources of the same domain that have more.

    Within a domain the missing clips are shared in proportion to the receivers' ratios (largest
    remainders), each capped by the clips it has beyond its own share; what a capped source cannot take
    goes round again to the others. Returns each ratio source's change of request (+ received, - the
    shortfall it gave away) of the domains with a shortfall; a domain's changes add up to minus the clips
    no source of it could take."""
    moved: dict[str, int] = {}
    groups: dict[str, list[SourceSpec]] = defaultdict(list)
    for spec in specs:
        if spec.ratio is not None:
            groups[domains[spec.name]].append(spec)
    for members in groups.values():
        short = sum(max(0, wanted[s.name] - available[s.name]) for s in members)
        if not short:
            continue
        asked = {s.name: min(wanted[s.name], available[s.name]) for s in members}
        left = short
        while left:
            receivers = [s for s in members if available[s.name] > asked[s.name]]
            if not receivers:
                break
            weight = sum(s.ratio for s in receivers)
            exact = {s.name: left * s.ratio / weight for s in receivers}
            give = {name: int(x) for name, x in exact.items()}
            for name in sorted(exact, key=lambda n: (give[n] - exact[n], n))[: left - sum(give.values())]:
                give[name] += 1
            for name, n in give.items():
                n = min(n, available[name] - asked[name])
                asked[name] += n
                left -= n
        for s in members:
            moved[s.name] = asked[s.name] - wanted[s.name]
    return moved


def sample_mixture(pools: dict[str, list[dict]], specs: list[SourceSpec], total: int | None, seed: int,
                   shortfall: str = "report", domains: dict[str, str] | None = None) -> tuple[list[dict], dict]:
    """Draw each source's share from its pool; same seed, same pools -> same selection.

    Each source has its own random stream (seeded by seed and source name), so adding or
    resizing one source leaves the others' selections unchanged. Selected records keep their
    pool order. `shortfall` (data_prep.shortfall): "report" the clips a source lacks, "error" on any,
    or "redistribute" them within their domain (`domains`: source -> domain; `redistribute`).
    The summary holds per source its request (`wanted`), the clips `moved` to or from it, what was
    `selected`, and `shortfall` (wanted - selected, what the source itself lacked).
    """
    available = {name: len(pool) for name, pool in pools.items()}
    wanted = allocate(specs, available, total)
    short = {name: (wanted[name], available[name]) for name in wanted if wanted[name] > available[name]}
    if short and shortfall == "error":
        raise DataError("data_prep.shortfall=error: sources with fewer usable clips than asked: "
                        + ", ".join(f"{name} {have} of {want}" for name, (want, have) in short.items()))
    moved = redistribute(specs, wanted, available, domains or {}) if shortfall == "redistribute" else {}
    chosen, summary = [], {}
    for spec in specs:
        pool = pools[spec.name]
        k = min(wanted[spec.name] + moved.get(spec.name, 0), len(pool))
        picks = sorted(random.Random(f"{seed}:{spec.name}").sample(range(len(pool)), k))
        chosen.extend(pool[i] for i in picks)
        summary[spec.name] = {"available": len(pool), "wanted": wanted[spec.name], "moved": moved.get(spec.name, 0),
                              "selected": k, "shortfall": max(0, wanted[spec.name] - k)}
    return chosen, summary


def make_probe(config: DataPrepConfig, guard: ContaminationIndex | None, max_seconds: float | None = None):
    """The per-clip function of the collect stage: header read, duration, bounds (`max_seconds`:
    data.max_audio_seconds), MMAR overlap."""

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
        if max_seconds is not None and duration > max_seconds:
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


def collect(config: DataPrepConfig, show_progress: bool = True, max_seconds: float | None = None) -> dict:
    """Scan, gate licences, dedup, sample and probe; returns the stage report (merged when every shard is done).

    `max_seconds`: the longest clip kept, the recipe's `data.max_audio_seconds` (None: any length)."""
    if not config.sources:
        raise DataError("data_prep.sources is empty: name at least one dataset")
    work = Path(config.work_dir)
    pools, scan = {}, {}
    for spec in config.sources:
        pools[spec.name], skipped = scan_source(spec, config.max_bad_rows)
        scan[spec.name] = {"candidates": len(pools[spec.name]), "skipped": dict(sorted(skipped.items()))}
    refused = licence_gate(pools, config.licences, config.unaccepted)
    duplicates = dedup(pools)
    for name, row in scan.items():
        row["licence_refused"] = refused.get(name, {})
        row["duplicates"] = duplicates.get(name, {"removed": 0, "kept_in": {}})
        row["licences"] = dict(Counter(r["licence_id"] for r in pools[name]).most_common())
    domains = {spec.name: get_adapter(spec.name).domain for spec in config.sources}
    chosen, mixture = sample_mixture(pools, config.sources, config.total, config.seed, config.shortfall, domains)
    candidates = work / f"{STAGE}.candidates.jsonl"
    write_records(candidates, chosen)  # atomic: shard processes write this same file at once
    guard = load_guard(config)
    extra = {
        "scan": scan, "mixture": mixture, "seed": config.seed, "total": config.total, "shortfall_rule": config.shortfall,
        "accepted_licences": config.licences, "max_seconds": max_seconds,
        "guard": {"meta": config.mmar_meta, "checks": guard.checks if guard else [], "mmar_audio_hashes": len(guard.audio) if guard else 0},
    }
    return run_stage(STAGE, each(make_probe(config, guard, max_seconds)), candidates, work, config.shard,
                     extra_report=extra, show_progress=show_progress)
