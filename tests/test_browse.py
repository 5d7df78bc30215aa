"""`eval browse`: the page's data (hand-worked), its escaping, and the page itself in headless Chromium."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
import wave
from collections import defaultdict
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from core.recipe import load_recipe
from eval.__main__ import main
from eval.browse import browse, embed
from eval.score import score
from eval.submission import SubmissionError
from tools.headless_chromium import Chromium, find_chromium

RUBRIC = [{"name": "Cue", "scoring_point": "Award 1 point if the cue is named.", "choices": [0, 1]},
          {"name": "Logic", "scoring_point": "Award 1 point if it follows.", "choices": [0, 1]}]
ITEMS = [  # id, modality, category, choices, answer, cues
    ("p1", "sound", "Signal Layer", ["one", "two"], "two", ["beep"]),
    ("p2", "music", "Perception Layer", ["rising", "falling"], "rising", ["melody"]),
    ("p3", "speech", "Semantic Layer", ["yes", "no"], "yes", []),
    ("p4", "sound", "Perception Layer", ["dog", "cat"], "dog", ["bark", "growl"]),
]
CLIP_SECONDS = 0.5
XSS = '</script><script>window.pwned=1</script><img src=x onerror="window.pwned=2"><!-- & \u2028'
# A: p1, p3 right, p2 wrong, p4 missing. B: p1, p2, p4 right, p3 wrong -> fixed p2, p4; broken p3. The judge
# cannot rate B's p4 (NOT EVALUATED: left out of B's totals and of the paired comparison).
ANSWERS = {"A": {"p1": "two", "p2": "falling", "p3": "yes"}, "B": {"p1": "two", "p2": "rising", "p3": "no", "p4": "dog"}}
SILENT_B = {"p1": "one", "p2": "rising", "p3": "no", "p4": "cat"}  # p1 and p4 change without audio


def thinking(run: str, rid: str) -> str:
    if (run, rid) == ("B", "p2"):
        return XSS
    return f"{run} reasons about {rid}: I hear a Beep." + (" Unratable." if (run, rid) == ("B", "p4") else "")


class EchoJudge:
    """Scores Cue 1 and Logic n % 2 on its n-th call for an item; each justification quotes the reasoning it read.
    Reasoning with "Unratable" gets a reply that does not parse."""

    identity, max_workers = "echo-judge", 1

    def __init__(self):
        self.calls = defaultdict(int)

    def complete(self, system: str, user: str) -> str:
        reasoning = user.split("- Model's Reasoning:\n", 1)[1]
        if "Unratable" in reasoning:
            return "I would rather not say."
        n = self.calls[reasoning]
        self.calls[reasoning] += 1
        return json.dumps([{"name": "Cue", "score": 1, "justification": f"call {n} read <b>{reasoning[:18]}</b>"},
                           {"name": "Logic", "score": n % 2, "justification": "sound" if n % 2 else "gap"}])


def write_clip(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(16000)
        w.writeframes(struct.pack("<h", 0) * int(16000 * CLIP_SECONDS))


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """Two scored runs on one benchmark with its clips, B with raw flags and a silent-audio run; the page."""
    tmp = tmp_path_factory.mktemp("browse")
    bench = tmp / "bench"
    meta = write_jsonl(bench / "meta.jsonl", [
        {"id": rid, "audio_path": f"./audio/{rid}.wav", "question": f"What is heard in {rid}?", "choices": choices,
         "answer": answer, "modality": modality, "category": category, "sub-category": "Counting",
         "thinking": f"Reference for {rid}.", "cue": cues, "rubric": RUBRIC}
        for rid, modality, category, choices, answer, cues in ITEMS])
    for rid, *_ in ITEMS:
        write_clip(bench / "audio" / f"{rid}.wav")
    judge = EchoJudge()
    for run, answers in ANSWERS.items():
        sub = write_jsonl(tmp / run / "submission.jsonl", [
            {"id": rid, "thinking_prediction": thinking(run, rid), "answer_prediction": a} for rid, a in answers.items()])
        if run == "B":  # as `infer run` writes it: p2's thinking was closed by the budget, p3 never closed
            write_jsonl(tmp / run / "submission.raw.jsonl", [
                {"id": rid, "truncated": rid == "p3", "thinking_budget_fired": rid == "p2", "thinking_cut": False}
                for rid in answers])
        recipe = load_recipe(None, [f"eval.meta={meta}", f"eval.submission={sub}", f"eval.report_dir={tmp / run / 'eval'}",
                                    f"eval.judge.cache={tmp / 'judge.sqlite'}", "eval.bootstrap=50", "eval.charts=false",
                                    "eval.judge.max_attempts=2"])
        score(recipe, progress=False, backend=judge)
    # a per-item field a later `eval score` may add (say, audio reliance): shown as it is
    report = json.loads((tmp / "B" / "eval" / "report.json").read_text())
    report["items"][0]["silent_answer"] = "<i>one</i>"
    (tmp / "B" / "eval" / "report.json").write_text(json.dumps(report))
    silent = write_jsonl(tmp / "B_silent" / "submission.jsonl", [
        {"id": rid, "thinking_prediction": "", "answer_prediction": a} for rid, a in SILENT_B.items()])
    page = browse([tmp / "A" / "eval", tmp / "B" / "eval" / "report.json"], tmp / "out" / "report.html",
                  silent=["-", silent], names=["base", "tuned"])
    return tmp, page


def page_data(page: Path) -> dict:
    block = re.search(r'<script type="application/json" id="browse-data">(.*?)</script>', page.read_text(), re.DOTALL)
    return json.loads(block.group(1))


def test_the_page_holds_each_items_runs_verdicts_and_clip(scored):
    tmp, page = scored
    data = page_data(page)
    items = {it["id"]: it for it in data["items"]}
    assert list(items) == ["p1", "p2", "p3", "p4"]
    status = {rid: [side["status"] for side in it["runs"]] for rid, it in items.items()}
    assert status == {"p1": ["scored", "scored"], "p2": ["wrong", "scored"], "p3": ["scored", "wrong"],
                      "p4": ["missing", "not_evaluated"]}
    assert "no parsable reply after 2 attempts" in items["p4"]["runs"][1]["reason"]
    a, b = data["runs"]
    assert (a["official"]["accuracy"], a["totals"]["accuracy"]) == (pytest.approx(200 / 3), 50.0)
    assert b["totals"]["accuracy"] == pytest.approx(200 / 3) and (a["name"], b["name"]) == ("base", "tuned")
    assert (data["paired"]["items"], data["paired"]["both_correct"], data["paired"]["b_only_correct"]) == (3, 1, 1)
    # The judge's verdicts: 5 raters, both criteria; Logic alternates 0, 1, 0, 1, 0 -> ratings .5 1 .5 1 .5, middle-3 mean 2/3.
    p1a = items["p1"]["runs"][0]
    raters = p1a["judge"]["raters"]
    assert p1a["judge"]["criteria"] == ["Cue", "Logic"] and len(raters) == 5
    assert [r[1] for r in raters] == [[0, "gap"], [1, "sound"], [0, "gap"], [1, "sound"], [0, "gap"]]
    assert p1a["score"] == pytest.approx(2 / 3)
    # Only this submission's replies, though A's and B's share the cache: each quotes the reasoning it judged.
    assert all("A reasons about p1" in r[0][1] for r in raters)
    assert all("B reasons about p1" in r[0][1] for r in items["p1"]["runs"][1]["judge"]["raters"])
    assert "judge" not in items["p2"]["runs"][0]  # wrong answers never reach the judge
    # Cue recall per cue, by the report's rule; raw flags for B only; silent-audio answers for B only.
    assert p1a["cue_hits"] == [True] and items["p4"]["runs"][1]["cue_hits"] == [False, False]
    assert "flags" not in p1a and items["p2"]["runs"][1]["flags"]["thinking_budget_fired"] is True
    assert items["p3"]["runs"][1]["flags"] == {"truncated": True, "thinking_budget_fired": False, "thinking_cut": False}
    assert b["silent_accuracy"] == 25.0 and a["silent"] is None
    assert items["p1"]["runs"][1]["silent"] == {"answer": "one", "correct": False, "changed": True}
    assert items["p2"]["runs"][1]["silent"]["changed"] is False
    assert items["p1"]["runs"][1]["extra"] == {"silent_answer": "<i>one</i>"} and "extra" not in p1a
    # The clip: relative to the page, and there.
    clip = page.parent / unquote(items["p2"]["audio"])
    assert items["p2"]["audio"] == "../bench/audio/p2.wav" and clip.resolve() == (tmp / "bench/audio/p2.wav").resolve()
    assert items["p2"]["runs"][1]["thinking"] == XSS  # the model's text, unaltered


def test_the_page_is_self_contained_and_the_data_cannot_close_its_block(scored):
    _, page = scored
    text = page.read_text()
    block = re.search(r'id="browse-data">(.*?)</script>', text, re.DOTALL).group(1)
    assert "<" not in block and ">" not in block and "&" not in block and "\u2028" not in block
    assert text.count("</script>") == 2  # the data block's and the page script's: the model's text adds none
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|https?://", text.replace(block, "")), "nothing loads from elsewhere"
    assert json.loads(embed({"t": XSS}))["t"] == XSS
    lone = embed({"t": "a\ud800b"})  # a lone surrogate, as json.loads gives it from "\\ud800"
    assert json.loads(lone)["t"] == "a\ud800b" and lone.encode("utf-8")


def test_input_errors_name_the_file(scored, tmp_path, capsys):
    tmp, _ = scored
    with pytest.raises(SubmissionError, match="no report.json"):
        browse([tmp / "A"], tmp_path / "x.html")  # the run folder, not its report folder
    other = json.loads((tmp / "A" / "eval" / "report.json").read_text())
    other["items"] = other["items"][:2]
    (tmp_path / "r.json").write_text(json.dumps(other))
    with pytest.raises(SubmissionError, match="different benchmarks"):
        browse([tmp / "A" / "eval", tmp_path / "r.json"], tmp_path / "x.html")
    assert main(["browse", str(tmp / "B"), "--out", str(tmp_path / "x.html")]) == 2
    assert "no report.json" in capsys.readouterr().err


def test_cli_writes_the_page_and_imports_no_torch(scored, tmp_path):
    tmp, _ = scored
    out = tmp_path / "one.html"
    code = ("import sys; from eval.__main__ import main; rc = main(['browse', sys.argv[1], '--out', sys.argv[2]]); "
            "print(rc, 'torch' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code, str(tmp / "A" / "eval"), str(out)], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).parents[1])
    assert run.stdout.split()[-2:] == ["0", "False"]
    data = page_data(out)
    assert len(data["runs"]) == 1 and data["paired"] is None
    assert (out.parent / unquote(data["items"][1]["audio"])).resolve() == (tmp / "bench/audio/p2.wav").resolve()


# ---------------------------------------------------------------- in a real browser


@pytest.fixture(scope="module")
def chromium():
    if find_chromium() is None:
        pytest.skip("no Chromium on this machine (Debian: apt-get install -y chromium; .ci/run installs it)")
    with Chromium(width=1300, height=900) as browser:
        yield browser


def choose(browser: Chromium, control: str, value: str) -> list[str]:
    """Set a filter the way a user does (the control's value, then its event); the ids of the rows shown."""
    event = "input" if control == "f-search" else "change"
    browser.eval(f"(() => {{ const c = document.getElementById({json.dumps(control)}); c.value = {json.dumps(value)}; "
                 f"c.dispatchEvent(new Event({json.dumps(event)})); }})()")
    return browser.eval("[...document.querySelectorAll('#rows tr.item')].map(tr => tr.dataset.id)")


def test_filters_and_an_items_audio_in_chromium(scored, chromium):
    tmp, page = scored
    chromium.open(page)
    assert chromium.eval("document.getElementById('count').dataset.count") == "4"
    cards = chromium.eval("[...document.querySelectorAll('#headline .card .big')].map(n => n.firstChild.textContent)")
    assert cards == ["66.67", "66.67", "+0.00"]
    assert choose(chromium, "f-status-1", "wrong") == ["p3"]
    assert choose(chromium, "f-status-1", "ne") == ["p4"]
    assert choose(chromium, "f-status-1", "") == ["p1", "p2", "p3", "p4"]
    assert choose(chromium, "f-change", "fixed") == ["p2", "p4"]
    assert choose(chromium, "f-change", "broken") == ["p3"]
    chromium.eval("document.getElementById('f-reset').click()")
    assert choose(chromium, "f-status-0", "wrong+missing") == ["p2", "p4"]
    assert choose(chromium, "f-modality", "music") == ["p2"]
    chromium.eval("document.getElementById('f-reset').click()")
    assert choose(chromium, "f-flags", "budget") == ["p2"]
    assert choose(chromium, "f-flags", "") == ["p1", "p2", "p3", "p4"]
    assert choose(chromium, "f-silent", "changed") == ["p1", "p4"]
    assert choose(chromium, "f-silent", "") and choose(chromium, "f-search", "A REASONS about p3") == ["p3"]
    assert choose(chromium, "f-search", "nothing like this") == []
    chromium.eval("document.getElementById('f-reset').click()")
    print(f"\nfiltering 4 items in Chromium: {chromium.eval('browse.lastMs'):.2f} ms (1,000 items: python -m bench.browse_bench)")

    chromium.eval("document.querySelector('tr.item[data-id=\"p1\"]').click()")
    fields = chromium.eval("[...document.querySelectorAll('tr.detail[data-id=\"p1\"] .side.r1 .field')].map(f => f.textContent)")
    assert "silent_answer: <i>one</i>" in fields and chromium.eval("document.querySelectorAll('i').length") == 0
    chromium.eval("document.querySelector('tr.item[data-id=\"p1\"]').dispatchEvent(new KeyboardEvent('keydown', {key: 'Enter'}))")
    assert chromium.eval("[document.querySelectorAll('tr.detail').length, document.activeElement.dataset.id]") == [0, "p1"]

    # Expand p2 by clicking its row: its clip, its question, both runs' reasoning as plain text.
    chromium.eval("document.querySelector('tr.item[data-id=\"p2\"]').click()")
    src = chromium.eval("document.querySelector('tr.detail[data-id=\"p2\"] audio').src")
    clip = Path(unquote(urlparse(src).path))
    assert clip.is_file() and clip.resolve() == (tmp / "bench/audio/p2.wav").resolve()
    duration = chromium.eval("""new Promise(done => {
        const a = document.querySelector('tr.detail[data-id="p2"] audio');
        a.preload = 'metadata';
        a.addEventListener('loadedmetadata', () => done(a.duration));
        a.addEventListener('error', () => done('error ' + a.error.code));
        a.load();
    })""", await_promise=True)
    assert duration == pytest.approx(CLIP_SECONDS, abs=0.01)  # the browser read the file itself
    texts = chromium.eval("[...document.querySelectorAll('tr.detail[data-id=\"p2\"] pre.reason')].map(p => p.textContent)")
    assert texts == ["Reference for p2.", "A reasons about p2: I hear a Beep.", XSS]
    # The model's markup stayed text: no script ran, no element was made from it.
    assert chromium.eval("[typeof window.pwned, document.querySelectorAll('img').length]") == ["undefined", 0]
    reasons = chromium.eval("[...document.querySelectorAll('tr.detail[data-id=\"p2\"] ul.just li li')].map(li => li.textContent)")
    # per criterion, the raters giving the same score and reason on one line
    assert reasons[0] == "rater 1 · 1: call 0 read <b></script><script>w</b>" and len(reasons) == 7
    assert reasons[5:] == ["rater 1, 3, 5 · 0: gap", "rater 2, 4 · 1: sound"]
