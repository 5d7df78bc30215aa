"""The data card: what the training data is made of (the challenge requires sources and proportions).

    python -m data_prep card RECIPE [overrides]  ->  WORK_DIR/data_card.md + data_card.json

It describes the newest pipeline output in the work dir (the last of PIPELINE whose NAME.jsonl
exists: the verified SFT file once stage 4 has run, else the questions, else the manifest):
records, clips and hours per source dataset and per domain with their proportions, licences (the
release's text and the licence gate's id, counted), and
for every stage report found in the work dir its counts in/out, rejections by reason and event
counts (retries, dropped questions).
Given the recipe's `data_prep` section, it also sets each source's achieved share (of the clips
collect selected, and of the described records) against the share the recipe asks for and the
reference mixture it reproduces (`reference_samples`, e.g. Audio-Cogito Table 1), and shows the
QA stage's few-shot sampling (seed-pool size, examples per call). From collect's report, per source:
clips removed as duplicates (and which source kept them), clips refused by the licence gate, and the
clips the shortfall rule moved (`moved`: + received, - given away).
With curation files (`--curation`, repeatable: the per-item JSONL of `python -m eval reliance --items`, or the
`.stats.jsonl` of `python -m train.rest buckets`), it shows each one's items per label or bucket and, where given,
their mean pass rate.
Records are read for `source`, `domain`, `licence`, `duration` and `audio_path`: later stages
carry these manifest fields forward so the card can describe their output too.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from core.items import DataError, read_jsonl
from core.recipe import DataPrepConfig
from data_prep.stage import read_reports

PIPELINE = ("collect", "qa", "cot", "verify")  # stage order


def newest_output(work_dir: Path) -> Path:
    for stage in reversed(PIPELINE):
        if (path := work_dir / f"{stage}.jsonl").is_file():
            return path
    raise DataError(f"{work_dir}: no stage output ({', '.join(s + '.jsonl' for s in PIPELINE)}); run collect first")


def _table(records: list[dict], key: str) -> dict[str, dict]:
    groups: dict[str, dict] = defaultdict(lambda: {"records": 0, "clips": {}, "licences": Counter(), "licence_ids": Counter(),
                                                   "domains": Counter()})
    for record in records:
        group = groups[str(record.get(key) or "unknown")]
        group["records"] += 1
        group["clips"][record.get("audio_path") or record["id"]] = float(record.get("duration") or 0.0)
        group["licences"][record.get("licence") or "unknown"] += 1
        group["licence_ids"][record.get("licence_id") or "unknown"] += 1
        group["domains"][record.get("domain") or "unknown"] += 1
    total = sum(g["records"] for g in groups.values()) or 1
    return {
        name: {
            "records": g["records"], "proportion": round(g["records"] / total, 4), "clips": len(g["clips"]),
            "hours": round(sum(g["clips"].values()) / 3600, 4), "licences": dict(g["licences"].most_common()),
            "licence_ids": dict(g["licence_ids"].most_common()),
            "domains": dict(g["domains"].most_common()),
        }
        for name, g in sorted(groups.items())
    }


def target_shares(config: DataPrepConfig) -> dict[str, float]:
    """Each source's share of the clips the recipe asks for (count, or ratio x total); sources that
    take everything they have set no target."""
    wanted = {s.name: s.count if s.ratio is None else s.ratio * config.total
              for s in config.sources if s.count is not None or s.ratio is not None}
    total = sum(wanted.values())
    return {name: n / total for name, n in wanted.items()} if total else {}


def mixture_against_targets(config: DataPrepConfig, collect_mixture: dict, by_source: dict) -> dict[str, dict]:
    targets = target_shares(config)
    references = {s.name: s.reference_samples for s in config.sources if s.reference_samples is not None}
    selected = {name: row["selected"] for name, row in collect_mixture.items()}

    def share(counts: dict[str, int], name: str) -> float | None:
        total = sum(counts.values())
        return round(counts[name] / total, 4) if total and name in counts else None

    records = {name: row["records"] for name, row in by_source.items()}
    return {
        spec.name: {
            "target_share": round(targets[spec.name], 4) if spec.name in targets else None,
            "reference_samples": references.get(spec.name),
            "reference_share": share(references, spec.name),
            "selected_share": share(selected, spec.name),
            "records_share": share(records, spec.name) if spec.name in records else (0.0 if records else None),
        }
        for spec in config.sources
    }


def curation_summary(path: str | Path) -> dict:
    """Items per `label` (audio reliance) or `bucket` (pass-rate buckets) of a curation JSONL, and the mean pass rate."""
    rows = [record for _, record in read_jsonl(path)]
    key = "label" if rows and "label" in rows[0] else "bucket"
    for lineno, row in enumerate(rows, 1):
        if key not in row:
            raise DataError(f"{path}:{lineno} (id={row.get('id')}): {key}: missing (not a curation file?)")
    rates = [row["pass_rate"] for row in rows if "pass_rate" in row]
    return {"path": str(path), "items": len(rows), "by": key, "counts": dict(sorted(Counter(row[key] for row in rows).items())),
            "mean_pass_rate": round(sum(rates) / len(rates), 4) if rates else None}


def build_card(work_dir: str | Path, data_file: str | Path | None = None, config: DataPrepConfig | None = None,
               curation: list[str | Path] = ()) -> dict:
    work = Path(work_dir)
    path = Path(data_file) if data_file is not None else newest_output(work)
    records = [record for _, record in read_jsonl(path)]
    clips = {r.get("audio_path") or r["id"]: float(r.get("duration") or 0.0) for r in records}
    reports = read_reports(work)
    order = [s for s in PIPELINE if s in reports] + sorted(s for s in reports if s not in PIPELINE)
    collect = reports.get("collect", {})
    by_source = _table(records, "source")
    qa = reports.get("qa", {})
    return {
        "data_file": str(path), "records": len(records), "clips": len(clips), "hours": round(sum(clips.values()) / 3600, 4),
        "by_source": by_source, "by_domain": _table(records, "domain"),
        "mixture": collect.get("mixture", {}), "seed": collect.get("seed"), "scan": collect.get("scan", {}),
        "shortfall_rule": collect.get("shortfall_rule"), "accepted_licences": collect.get("accepted_licences"),
        "targets": mixture_against_targets(config, collect.get("mixture", {}), by_source) if config is not None else {},
        "seed_pool": {k: qa[k] for k in ("seed_questions", "seed_pool_size", "n_shots", "max_questions") if k in qa},
        "stages": {s: {k: reports[s].get(k) for k in ("in", "out", "rejected", "seconds")} | {"counts": reports[s].get("counts") or {}}
                   for s in order},
        "curation": [curation_summary(path) for path in curation],
    }


def _counts(counts: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in counts.items()) or "-"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.2f} %"


def render_markdown(card: dict) -> str:
    lines = [
        "# Data card", "",
        f"Data file: `{card['data_file']}`: **{card['records']} records**, {card['clips']} clips, "
        f"**{card['hours']:.2f} hours** of audio.", "",
        "## Sources", "",
        "| source | records | share | clips | hours | domains | licences | licence counts |", "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for name, row in card["by_source"].items():
        lines.append(f"| {name} | {row['records']} | {100 * row['proportion']:.1f} % | {row['clips']} | {row['hours']:.2f} | "
                     f"{', '.join(row['domains'])} | {'; '.join(row['licences'])} | {_counts(row.get('licence_ids') or {})} |")
    lines += ["", "## Domains", "", "| domain | records | share | clips | hours |", "|---|---:|---:|---:|---:|"]
    for name, row in card["by_domain"].items():
        lines.append(f"| {name} | {row['records']} | {100 * row['proportion']:.1f} % | {row['clips']} | {row['hours']:.2f} |")
    if card["mixture"]:
        lines += ["", f"## Mixture (seed {card['seed']}, shortfall rule: {card.get('shortfall_rule') or 'report'})", "",
                  "`available`: usable clips after the licence gate and dedup; `shortfall moved`: clips the shortfall rule "
                  "moved to (+) or away from (-) the source; `duplicates removed`: clips whose audio another clip (kept in "
                  "the named source) already holds.", "",
                  "| source | available | wanted | shortfall moved | selected | shortfall | duplicates removed | licence refused "
                  "| skipped at scan |", "|---|---:|---:|---:|---:|---:|---|---|---|"]
        for name, row in card["mixture"].items():
            scan = card["scan"].get(name, {})
            dups = scan.get("duplicates") or {}
            removed = f"{dups['removed']} (kept in {_counts(dups['kept_in'])})" if dups.get("removed") else "0"
            lines.append(f"| {name} | {row['available']} | {row['wanted']} | {row.get('moved', 0):+d} | {row['selected']} | "
                         f"{row['shortfall']} | {removed} | {_counts(scan.get('licence_refused') or {})} | "
                         f"{_counts(scan.get('skipped') or {})} |")
    if card["targets"]:
        lines += ["", "## Mixture against the recipe", "",
                  "Shares of the recipe's request (count, or ratio of `total`), of the reference mixture it reproduces "
                  "(`reference_samples`), of the clips collect selected and of the records above.", "",
                  "| source | recipe share | reference samples | reference share | selected share | records share |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name, row in card["targets"].items():
            reference = "-" if row["reference_samples"] is None else f"{row['reference_samples']:,}"
            lines.append(f"| {name} | {_percent(row['target_share'])} | {reference} | {_percent(row['reference_share'])} | "
                         f"{_percent(row['selected_share'])} | {_percent(row['records_share'])} |")
    if pool := card["seed_pool"]:
        lines += ["", "## QA few-shot sampling", "",
                  f"Seed pool `{pool.get('seed_questions')}`: **{pool.get('seed_pool_size', '?')} questions**; each QA call shows "
                  f"{pool.get('n_shots', '?')} of them, drawn seeded per clip and attempt, and asks for 1 to "
                  f"{pool.get('max_questions', '?')} questions."]
    lines += ["", "## Stages", "", "| stage | in | out | rejected | seconds |", "|---|---:|---:|---|---:|"]
    for name, row in card["stages"].items():
        rejected = ", ".join(f"{k}: {v}" for k, v in (row["rejected"] or {}).items()) or "-"
        lines.append(f"| {name} | {row['in']} | {row['out']} | {rejected} | {row['seconds']} |")
    if any(row["counts"] for row in card["stages"].values()):
        lines += ["", "Events within records (retried replies, single questions dropped, judge replies that did not parse):", "",
                  "| stage | counts |", "|---|---|"]
        for name, row in card["stages"].items():
            if row["counts"]:
                lines.append(f"| {name} | {', '.join(f'{k}: {v}' for k, v in row['counts'].items())} |")
    if card.get("curation"):
        lines += ["", "## Curation", "", "Per-item statistics of curation runs (audio reliance, pass-rate buckets):", "",
                  "| file | items | by | counts | mean pass rate |", "|---|---:|---|---|---:|"]
        for row in card["curation"]:
            rate = "-" if row["mean_pass_rate"] is None else f"{row['mean_pass_rate']:.3f}"
            lines.append(f"| `{row['path']}` | {row['items']} | {row['by']} | "
                         f"{', '.join(f'{k}: {v}' for k, v in row['counts'].items())} | {rate} |")
    return "\n".join(lines) + "\n"


def write_card(work_dir: str | Path, data_file: str | Path | None = None, config: DataPrepConfig | None = None,
               curation: list[str | Path] = ()) -> dict:
    card = build_card(work_dir, data_file, config, curation)
    work = Path(work_dir)
    (work / "data_card.json").write_text(json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    (work / "data_card.md").write_text(render_markdown(card))
    return card
