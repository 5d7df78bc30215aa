"""The results browser on 1,000 items: page size, load time, and how long filtering takes in Chromium.

    python -m bench.browse_bench [--items 1000] [--json runs/bench/browse_bench.json] [--keep DIR]

Two runs of MMAR-shaped items (the 40 real records of tests/data/mmar_sample.jsonl, repeated under new
ids), each with ~2,000 characters of reasoning (the reference's, then sentences of other records), five
judge ratings with a reason per criterion, raw flags and a silent-audio run: scored by `eval score` (an
instant in-process judge), written by `eval browse`, opened in headless Chromium (tools/headless_chromium.py).
Each filter is set as a user sets it (the control's value, then its event). Figures (median of --reps):
the page's own timer around filtering and building the visible page of rows; the same with style and
layout forced; and the wall time of the round trip from Python (DevTools protocol included).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import struct
import tempfile
import time
import wave
from pathlib import Path

from bench.common import print_table, write_json
from core.recipe import load_recipe
from eval.browse import browse
from eval.score import score
from tools.headless_chromium import Chromium, find_chromium

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "mmar_sample.jsonl"


class ReasonedJudge:
    """Instant, with a ~30-word reason per criterion (the official format asks for under 50)."""

    identity, max_workers = "bench-judge", 4

    def complete(self, system: str, user: str) -> str:
        names = [line.split(": ", 1)[1] for line in user.splitlines() if line.startswith("### Criterion: ")]
        return json.dumps([{"name": name, "score": (i + len(user)) % 2,
                            "justification": "The reasoning " + ("names" if (i + len(user)) % 2 else "misses") +
                            " this point; it describes the clip in general terms and then argues from the choices, "
                            "which the criterion asks to see stated explicitly."} for i, name in enumerate(names)])


def write_clip(path: Path, seconds: float = 1.0) -> None:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(struct.pack("<h", 0) * int(16000 * seconds))


def build(tmp: Path, n: int, seed: int) -> Path:
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    (tmp / "bench" / "audio").mkdir(parents=True)
    for k in range(8):
        write_clip(tmp / "bench" / "audio" / f"clip{k}.wav")
    sentences = [s.strip().rstrip(".") + "." for r in records for s in r["thinking"].split(". ") if len(s) > 40]
    meta = [{**records[i % len(records)], "id": f"item{i:04d}", "audio_path": f"./audio/clip{i % 8}.wav"} for i in range(n)]
    (tmp / "bench" / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta))
    judge = ReasonedJudge()
    reports = []
    for run, right in (("base", 0.55), ("tuned", 0.7)):
        folder = tmp / run
        folder.mkdir()
        with (folder / "submission.jsonl").open("w") as sub, (folder / "submission.raw.jsonl").open("w") as raw, \
                (folder / "silent.jsonl").open("w") as silent:
            for r in meta:
                answer = r["answer"] if rng.random() < right else rng.choice(r["choices"])
                thinking = r["thinking"]
                while len(thinking) < 2000:  # the item's reference reasoning, then other items' sentences
                    thinking += "\n\n" + rng.choice(sentences)
                sub.write(json.dumps({"id": r["id"], "thinking_prediction": thinking, "answer_prediction": answer}) + "\n")
                raw.write(json.dumps({"id": r["id"], "truncated": rng.random() < 0.05, "thinking_budget_fired": rng.random() < 0.1,
                                      "thinking_cut": False}) + "\n")
                silent.write(json.dumps({"id": r["id"], "thinking_prediction": "",
                                         "answer_prediction": rng.choice(r["choices"])}) + "\n")
        recipe = load_recipe(None, [f"eval.meta={tmp / 'bench' / 'meta.jsonl'}", f"eval.submission={folder / 'submission.jsonl'}",
                                    f"eval.report_dir={folder / 'eval'}", f"eval.judge.cache={tmp / 'judge.sqlite'}",
                                    "eval.bootstrap=100", "eval.charts=false"])
        score(recipe, progress=False, backend=judge)
        reports.append(folder)
    return browse([f / "eval" for f in reports], tmp / "report.html", silent=[f / "silent.jsonl" for f in reports],
                  names=["base", "tuned"])


# (what, control, value): each applied to all items (after a reset), as the first filter a user picks
STEPS = [("search a word (id, question, answers, reasoning)", "f-search", "rhythm"),
         ("B result: wrong", "f-status-1", "wrong"), ("A → B: fixed", "f-change", "fixed"),
         ("modality: music", "f-modality", "music"), ("output: thinking cut by the budget", "f-flags", "budget"),
         ("audio reliance: answer changes", "f-silent", "changed"), ("order: A's rubric score", "f-sort", "score0")]


def timed(browser: Chromium, control: str, value: str) -> tuple[float, float, float, int]:
    """(the page's filter + DOM ms, the same with style and layout, the round trip's wall ms, rows matching)."""
    event = "input" if control == "f-search" else "change"
    act = "c.click()" if control == "f-reset" else f"c.value = {json.dumps(value)}; c.dispatchEvent(new Event({json.dumps(event)}))"
    started = time.perf_counter()
    laid_out, count = browser.eval(
        f"(() => {{ const t = performance.now(), c = document.getElementById({json.dumps(control)}); {act}; "
        "document.body.offsetHeight; return [performance.now() - t, +document.getElementById('count').dataset.count]; })()")
    wall = 1000 * (time.perf_counter() - started)
    return browser.eval("browse.lastMs"), laid_out, wall, count


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=1000)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--keep", help="write the page (and its runs) here instead of a temporary folder")
    args = p.parse_args()
    if find_chromium() is None:
        raise SystemExit("no Chromium on this machine (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(args.keep) if args.keep else Path(scratch)
        tmp.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        page = build(tmp, args.items, args.seed)
        built = time.perf_counter() - started
        page_mb = page.stat().st_size / 1e6
        rows, loads = [], []
        with Chromium(width=1400, height=1000) as browser:
            for _ in range(args.reps):
                started = time.perf_counter()
                browser.open(page)
                loads.append(1000 * (time.perf_counter() - started))
            samples: dict[str, list] = {step[0]: [] for step in STEPS}
            for _ in range(args.reps):
                for what, control, value in STEPS:
                    browser.eval("document.getElementById('f-reset').click()")
                    samples[what].append(timed(browser, control, value))
            samples["reset to all items"] = [timed(browser, "f-reset", "") for _ in range(args.reps)]
            started = time.perf_counter()
            browser.eval("document.getElementById('f-reset').click(); document.querySelector('tr.item').click()")
            expand = 1000 * (time.perf_counter() - started)
        for what in samples:
            page_ms, layout_ms, wall_ms, count = zip(*samples[what])
            rows.append({"step": what, "rows matching": count[0], "filter + DOM ms": statistics.median(page_ms),
                         "+ style & layout ms": statistics.median(layout_ms), "round trip ms": statistics.median(wall_ms)})
    figures = {"items": args.items, "page_mb": page_mb, "build_s": built,
               "load_ms_median": statistics.median(loads), "expand_item_ms": expand, "steps": rows}
    print(f"{args.items} items, two runs: a {page_mb:.1f} MB page written in {built:.1f} s (scoring both included); "
          f"opened in {figures['load_ms_median']:.0f} ms (median of {args.reps}, load event); first item expanded in {expand:.1f} ms")
    print_table(rows, f"Filtering {args.items} items in headless Chromium (median of {args.reps})")
    write_json(args.json, figures)


if __name__ == "__main__":
    main()
