"""Does the model listen? The same items answered with their audio and without it.

    python -m infer run R.yaml infer.output=runs/x/silent/submission.jsonl infer.audio_ablation=silence
    python -m eval reliance runs/x/submission.jsonl runs/x/silent/submission.jsonl --meta META [--out F]

    python -m eval reliance ... --items per_item.jsonl      # the audio-reliance curation, per item

Reported: accuracy with the audio and with the ablated audio (silence, or another item's clip),
chance (the mean of 1/choices), the share of items whose answer changes, and a flag when accuracy
hardly drops: a drop under a third of the normal run's gap above chance (`HARDLY_DROPS`) means the
answers come mostly from the text (MAPO's modality collapse). A model at or below chance has no gap
to lose: the flag is then not raised and the report says the test cannot tell. Correctness is the
challenge's answer rule; ids missing from either run are left out and counted.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

from core.answer_rule import is_correct
from eval.submission import SubmissionError, load_meta, load_submission

HARDLY_DROPS = 1 / 3  # flag when (normal - ablated) < this share of (normal - chance)


def reliance_figures(meta: list[dict], normal: dict[str, str], ablated: dict[str, str]) -> dict:
    """The reliance figures of two runs' answers (id -> answer text) on `meta`'s items."""
    both = [rec for rec in meta if rec["id"] in normal and rec["id"] in ablated]
    if not both:
        raise SubmissionError("the two runs share no item of the metadata")
    n = len(both)
    right = sum(is_correct(normal[r["id"]], r["answer"], r["choices"]) for r in both)
    right_ablated = sum(is_correct(ablated[r["id"]], r["answer"], r["choices"]) for r in both)
    changed = sum(normal[r["id"]].strip() != ablated[r["id"]].strip() for r in both)
    accuracy, accuracy_ablated = 100 * right / n, 100 * right_ablated / n
    chance = 100 * sum(1 / len(r["choices"]) for r in both) / n
    gap, drop = accuracy - chance, accuracy - accuracy_ablated
    return {
        "items": n, "left_out": len(meta) - n,
        "accuracy": accuracy, "accuracy_ablated": accuracy_ablated, "drop": drop, "chance": chance,
        "gap_above_chance": gap, "changed": 100 * changed / n,
        # share of the gap above chance that the ablation takes away (1: down to chance; 0: no drop)
        "reliance": drop / gap if gap > 0 else None,
        "hardly_drops": gap > 0 and drop < HARDLY_DROPS * gap,
        "threshold": HARDLY_DROPS,
    }


def reliance(normal_sub: str | Path, ablated_sub: str | Path, meta_path: str | Path) -> dict:
    meta = load_meta(meta_path)
    runs = [{rid: p.answer for rid, p in load_submission(path).predictions.items()} for path in (normal_sub, ablated_sub)]
    return {"normal": str(normal_sub), "ablated": str(ablated_sub), "meta": str(meta_path),
            **reliance_figures(meta, *runs)}


def verdict(r: dict) -> str:
    if r["reliance"] is None:
        return "no gap above chance: the test cannot tell"
    if r["hardly_drops"]:
        return f"FLAG: accuracy hardly drops without the audio (< {r['threshold']:.2f} of the gap above chance)"
    return "listens: accuracy drops without the audio"


def markdown(r: dict) -> str:
    reliance_share = "–" if r["reliance"] is None else f"{r['reliance']:.2f}"
    return "\n".join([
        f"# Audio reliance: `{r['normal']}` vs `{r['ablated']}`", "",
        "| items | accuracy % | accuracy without audio % | drop | chance % | share of gap lost | answers changed % |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {r['items']} | {r['accuracy']:.1f} | {r['accuracy_ablated']:.1f} | {r['drop']:+.1f} | {r['chance']:.1f} "
        f"| {reliance_share} | {r['changed']:.1f} |", "",
        verdict(r) + (f"; {r['left_out']} items missing from either run left out" if r["left_out"] else "") + ".", ""])


def write_json(r: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(r, indent=1))


# ---------------------------------------------------------------- per item: the audio-reliance curation

LABELS = ("weak-audio", "audio-reliant", "unsolved", "missing")


def label(with_audio: bool | None, without_audio: bool | None) -> str:
    """weak-audio: right without the audio (the text or priors give it away: SFT material, AudioMCQ); audio-reliant:
    right only with it (RL material); unsolved: wrong either way; missing: absent from a run, not labelled."""
    if with_audio is None or without_audio is None:
        return "missing"
    if without_audio:
        return "weak-audio"
    return "audio-reliant" if with_audio else "unsolved"


def item_labels(normal_sub: str | Path, ablated_sub: str | Path, meta_path: str | Path) -> list[dict]:
    """Per meta item: {id, correct_with_audio, correct_ablated, label, category, sub-category, modality}."""
    meta = load_meta(meta_path)
    runs = [{rid: p.answer for rid, p in load_submission(path).predictions.items()} for path in (normal_sub, ablated_sub)]
    rows = []
    for rec in meta:
        results = [is_correct(run[rec["id"]], rec["answer"], rec["choices"]) if rec["id"] in run else None for run in runs]
        rows.append({"id": rec["id"], "correct_with_audio": results[0], "correct_ablated": results[1], "label": label(*results),
                     "category": rec.get("category"), "sub-category": rec.get("sub-category"), "modality": rec.get("modality")})
    return rows


def label_counts(rows: list[dict]) -> dict[str, int]:
    counts = Counter(row["label"] for row in rows)
    return {name: counts.get(name, 0) for name in LABELS}


def write_items(rows: list[dict], path: str | Path) -> None:
    """The per-item JSONL, written whole (a temporary file, then a rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    os.replace(tmp, path)
