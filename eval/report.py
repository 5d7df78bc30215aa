"""Totals, tables, confidence intervals, the cue-recall diagnostic, and the report files.

Counting rules (PROTOCOL.md): Accuracy = 100 * mean(correct); Rubrics = 100 * mean(item score),
wrong answers counting 0; CRS = Rubrics / Accuracy. The headline gives two sets of totals: the
official ones over the submitted items (as the challenge's scripts count), and ours over all items,
where items the submission lacks count as wrong.
Items whose judge calls all failed are NOT EVALUATED: like the official script, they are left out
of every denominator, but unlike it they are listed, and the totals say how many.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from core.redact import redact

GROUPS = (("modality", "modality"), ("category", "category"), ("sub-category", "sub_category"))


@dataclass
class ItemResult:
    id: str
    modality: str | None
    category: str | None
    sub_category: str | None
    status: str  # scored | wrong | missing | not_evaluated | not_judged (judge backend none)
    correct: bool
    score: float | None  # item rubric score in [0, 1]; None when not judged / not evaluated
    ratings: list[float]
    cues_found: int
    cues_total: int
    reason: str | None = None  # why NOT EVALUATED

    @property
    def counted(self) -> bool:
        return self.status != "not_evaluated"


def cue_hits(cues: Sequence[str] | None, thinking: str) -> tuple[int, int]:
    """(cues mentioned in the thinking, all cues): case-insensitive substring match."""
    cues = [c for c in (cues or []) if isinstance(c, str) and c.strip()]
    text = thinking.lower()
    return sum(c.lower() in text for c in cues), len(cues)


def summarize(items: Sequence[ItemResult], judged: bool) -> dict:
    counted = [it for it in items if it.counted]
    n = len(counted)
    acc = 100.0 * sum(it.correct for it in counted) / n if n else None
    rub = 100.0 * sum(it.score or 0.0 for it in counted) / n if (n and judged) else None
    cues_total = sum(it.cues_total for it in items)
    return {
        "n": n,
        "correct": sum(it.correct for it in counted),
        "not_evaluated": len(items) - n,
        "accuracy": acc,
        "rubrics": rub,
        "crs": (rub / acc) if (rub is not None and acc) else None,
        "cue_recall": 100.0 * sum(it.cues_found for it in items) / cues_total if cues_total else None,
    }


def tables(items: Sequence[ItemResult], judged: bool) -> dict[str, list[dict]]:
    out = {}
    for title, attr in GROUPS:
        names = sorted({getattr(it, attr) or "(none)" for it in items})
        out[title] = [{"name": name, **summarize([it for it in items if (getattr(it, attr) or "(none)") == name], judged)}
                      for name in names]
    return out


def bootstrap_ci(values: np.ndarray, resamples: int, seed: int, level: float = 0.95) -> tuple[float, float] | None:
    """Percentile interval of the mean (in %), items resampled with replacement."""
    if resamples <= 0 or values.size == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 256):  # bounded memory for large benchmarks
        block = rng.integers(0, values.size, size=(min(256, resamples - start), values.size))
        means[start : start + block.shape[0]] = values[block].mean(axis=1)
    lo, hi = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return 100.0 * float(lo), 100.0 * float(hi)


def confidence_intervals(items: Sequence[ItemResult], judged: bool, resamples: int, seed: int) -> dict:
    counted = [it for it in items if it.counted]
    correct = np.array([it.correct for it in counted], dtype=float)
    out = {"level": 0.95, "resamples": resamples, "seed": seed,
           "accuracy": bootstrap_ci(correct, resamples, seed)}
    if judged:
        out["rubrics"] = bootstrap_ci(np.array([it.score or 0.0 for it in counted]), resamples, seed)
    return out


# ---------------------------------------------------------------- files


def _fmt(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _table_md(rows: list[dict], first: str, judged: bool) -> list[str]:
    head = f"| {first} | n | Accuracy | Rubrics | CRS | cue recall | not evaluated |"
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rub = _fmt(r["rubrics"]) if judged else "not computed"
        lines.append(f"| {r['name']} | {r['n']} | {_fmt(r['accuracy'])} | {rub} | {_fmt(r['crs'], 3)} "
                     f"| {_fmt(r['cue_recall'], 1)} | {r['not_evaluated']} |")
    return lines


def markdown(report: dict) -> str:
    judged, t, o, ci = report["judged"], report["totals"], report["official"], report["confidence"]
    acc_ci = ci.get("accuracy")
    rub_ci = ci.get("rubrics")
    lines = [f"# Evaluation: {report['submission']}", "",
             f"Benchmark `{report['meta']}`, {report['items_total']} items; judge: {report['judge_name']}.", "",
             f"- **official**: {o['label']}; {o['n']} items.",
             f"- **all items**: {t['label']}; {t['n']} items.", ""]
    lines += ["| metric | official | all items | 95% CI, all items (bootstrap) |", "|---|---:|---:|---|"]
    lines.append(f"| Accuracy | {_fmt(o['accuracy'])} | {_fmt(t['accuracy'])} "
                 f"| {_fmt(acc_ci[0]) + '–' + _fmt(acc_ci[1]) if acc_ci else '–'} |")
    if judged:
        lines.append(f"| Rubrics | {_fmt(o['rubrics'])} | {_fmt(t['rubrics'])} "
                     f"| {_fmt(rub_ci[0]) + '–' + _fmt(rub_ci[1]) if rub_ci else '–'} |")
        lines.append(f"| CRS | {_fmt(o['crs'], 3)} | {_fmt(t['crs'], 3)} | |")
    else:
        lines.append("| Rubrics | not computed (judge backend `none`) | | |")
    lines.append(f"| audio-cue recall (diagnostic) | {_fmt(o['cue_recall'], 1)} | {_fmt(t['cue_recall'], 1)} | |")
    lines += ["", f"**How the totals count:** {report['counting']}", ""]
    if report["not_evaluated"]:
        lines += [f"## NOT EVALUATED ({len(report['not_evaluated'])} items)", "",
                  "Correct answers whose judge ratings could not all be obtained; re-run to fill them "
                  "(finished ratings come from the cache).", ""]
        lines += [f"- `{x['id']}`: {x['reason']}" for x in report["not_evaluated"]] + [""]
    if report["missing_ids"]:
        lines += [f"## Missing from the submission ({len(report['missing_ids'])} ids, scored as wrong)", "",
                  ", ".join(f"`{i}`" for i in report["missing_ids"]), ""]
    if report["unknown_ids"]:
        lines += [f"## Not in the benchmark ({len(report['unknown_ids'])} ids, ignored)", "",
                  ", ".join(f"`{i}`" for i in report["unknown_ids"]), ""]
    if report["warnings"]:
        lines += [f"## Submission warnings ({len(report['warnings'])})", ""] + [f"- {w}" for w in report["warnings"]] + [""]
    for title, rows in report["tables"].items():
        lines += [f"## By {title}", ""] + _table_md(rows, title, judged) + [""]
    for chart in report["charts"]:
        lines += [f"![{chart}]({chart})", ""]
    if report["judge"]:
        j = report["judge"]
        lines += ["## Judge calls", "", "| ratings needed | from cache | calls made | retried | parse failures "
                  "| transient errors | failed ratings | seconds |", "|---:|---:|---:|---:|---:|---:|---:|---:|",
                  f"| {j['requested']} | {j['cached']} | {j['calls_made']} | {j['retried']} | {j['parse_failures']} "
                  f"| {j['transient_errors']} | {j['failed_ratings']} | {j['seconds']:.1f} |", ""]
        if j["parse_failure_examples"]:
            lines += ["Parse failures (first ones):", ""] + [f"- {e}" for e in j["parse_failure_examples"]] + [""]
    lines += [f"Config: `{report['recipe_file']}`.", ""]
    return "\n".join(lines)


def charts(report: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for title in ("modality", "category"):
        rows = report["tables"][title]
        metrics = [("Accuracy", "accuracy")] + ([("Rubrics", "rubrics")] if report["judged"] else [])
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(rows)), 4))
        width = 0.8 / len(metrics)
        for k, (label, key) in enumerate(metrics):
            xs = [i + (k - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
            ax.bar(xs, [r[key] or 0.0 for r in rows], width, label=label)
        ax.set_xticks(range(len(rows)), [f"{r['name']}\n(n={r['n']})" for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_ylim(0, 100)
        ax.set_ylabel("%")
        ax.set_title(f"By {title}")
        ax.legend()
        fig.tight_layout()
        name = f"by_{title}.png"
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names


def write(report: dict, out_dir: Path, items: Sequence[ItemResult], with_charts: bool) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    report["charts"] = charts(report, out_dir) if with_charts else []
    paths = {"json": out_dir / "report.json", "markdown": out_dir / "report.md"}
    payload = {**report, "items": [asdict(it) for it in items]}
    # judge error messages end up here: a server may echo the key it refused
    paths["json"].write_text(redact(json.dumps(payload, indent=1, ensure_ascii=False)))
    paths["markdown"].write_text(redact(markdown(report)))
    return paths
