"""`python -m eval suite` on the tiny kit: the fixtures of every benchmark (tests/data/, each in its
released schema) with clips the project generates, answered by `infer run` and scored; then the
same suite re-scored from hand-written answers, whose tables are known, and two runs compared."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from core.audio import write_wav
from core.recipe import load_recipe
from data_prep.synthetic import tone
from eval.__main__ import main as eval_main
from eval.benchmarks import read_items
from eval.suite import compare_suites, run_suite

DATA = Path(__file__).parent / "data"
FIXTURES = {"mmau": "mmau_sample.json", "mmau-test": "mmau_test_sample.json", "mmsu": "mmsu_sample.jsonl",
            "mmau-pro": "mmau_pro_sample.jsonl", "mmar": "mmar_sample.jsonl"}
KINDS = {"mmau-test": "mmau"}


@pytest.fixture(scope="module")
def suite_recipe(tiny_checkpoint, tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    benchmarks = []
    for n, (name, fixture) in enumerate(FIXTURES.items()):
        folder = root / name
        folder.mkdir()
        meta = folder / fixture
        shutil.copy(DATA / fixture, meta)
        kind = KINDS.get(name, name)
        items, _ = read_items(kind, meta)
        for k, item in enumerate(items[:4] if kind == "mmar" else items):
            write_wav(item["audio_path"], tone(300 + 40 * k + 7 * n, 0.6))
        benchmarks.append({"name": name, "kind": kind, "meta": str(meta), **({"limit": 4} if kind == "mmar" else {})})
    recipe = {"name": "suite-test", "model": {"path": str(tiny_checkpoint), "dtype": "float32"},
              "infer": {"adapter": None, "batch_size": 8, "max_new_tokens": 3, "min_new_tokens": 3, "do_sample": False},
              "suite": {"out_dir": str(root / "run"), "benchmarks": benchmarks, "bootstrap": 200}}
    path = root / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def first_suite(suite_recipe) -> dict:
    """The suite answered by the tiny model, once per module; kept as first_suite.json for the comparison."""
    suite = run_suite(load_recipe(suite_recipe))
    out = Path(load_recipe(suite_recipe).suite.out_dir)
    shutil.copy(out / "suite.json", out.parent / "first_suite.json")
    return suite


def test_suite_answers_and_scores_every_benchmark(suite_recipe, first_suite):
    suite = first_suite
    by_name = {b["name"]: b for b in suite["benchmarks"]}
    expected = {"mmau": (12, 0), "mmau-test": (0, 2), "mmsu": (6, 0), "mmau-pro": (4, 0), "mmar": (4, 0)}
    for name, (n, withheld) in expected.items():
        totals = by_name[name]["totals"]
        assert (totals["n"], totals["withheld"], totals["missing"]) == (n, withheld, 0), name  # every item answered
        statuses = [r["status"] for r in by_name[name]["rows"]]
        assert len(statuses) == n + withheld and statuses.count("correct") == totals["correct"]
    assert by_name["mmau-pro"]["not_answered"] == {
        "multi-audio (infer gives one clip per prompt; not scored here)": 1,
        "open-ended (official: LLM judge; not scored here)": 1,
        "instruction following (official: format rules; not scored here)": 1}
    test_file = json.loads(Path(by_name["mmau-test"]["test_submission"]).read_text())
    assert [r["id"] for r in test_file] == ["mmau-test-fixture-0001", "mmau-test-fixture-0002"]
    assert all(r["model_prediction"] == r["model_output"] for r in test_file)
    out = Path(load_recipe(suite_recipe).suite.out_dir)
    assert "| mmau-pro | mmau-pro | 4 |" in (out / "suite.md").read_text()


def write_answers(submission: Path, answers: dict[str, str]) -> None:
    submission.write_text("".join(json.dumps({"id": rid, "thinking_prediction": "", "answer_prediction": a}) + "\n"
                                  for rid, a in answers.items()))


def test_suite_tables_from_known_answers_and_the_comparison(suite_recipe, first_suite, capsys):
    recipe = load_recipe(suite_recipe)
    out = Path(recipe.suite.out_dir)
    mmsu = [json.loads(line) for line in (out / "mmsu" / "items.jsonl").read_text().splitlines()]
    # right, right (as a letter), wrong, non-answer, right, missing
    write_answers(out / "mmsu" / "submission.jsonl", {
        mmsu[0]["id"]: mmsu[0]["answer"], mmsu[1]["id"]: "B", mmsu[2]["id"]: "A statement",
        mmsu[3]["id"]: "I cannot tell", mmsu[4]["id"]: "<think>two voices</think>Two"})
    mmau = [json.loads(line) for line in (out / "mmau" / "items.jsonl").read_text().splitlines()]
    write_answers(out / "mmau" / "submission.jsonl", {it["id"]: it["answer"] for it in mmau})
    assert eval_main(["suite", str(suite_recipe), "--score-only"]) == 0
    assert "| mmsu | mmsu | 6 | 50.0 |" in capsys.readouterr().out
    suite = json.loads((out / "suite.json").read_text())
    by_name = {b["name"]: b for b in suite["benchmarks"]}
    totals = by_name["mmsu"]["totals"]
    assert (totals["correct"], totals["non_answers"], totals["missing"]) == (3, 1, 1)
    assert totals["accuracy_submitted"] == pytest.approx(60.0)
    assert {r["name"]: (r["n"], r["correct"]) for r in by_name["mmsu"]["tables"]["category"]} == {
        "Perception": (4, 3), "Reasoning": (2, 0)}
    assert by_name["mmau"]["totals"]["accuracy"] == 100.0
    assert {r["name"]: r["n"] for r in by_name["mmau"]["tables"]["task"]} == {"music": 3, "sound": 4, "speech": 5}

    first = json.loads((out.parent / "first_suite.json").read_text())
    first_mmau = {b["name"]: b for b in first["benchmarks"]}["mmau"]["totals"]["correct"]
    comparison = compare_suites(out.parent / "first_suite.json", out)
    rows = {r["benchmark"]: r for r in comparison["benchmarks"]}
    assert rows["mmau"]["items"] == 12 and rows["mmau"]["accuracy_b"] == 100.0
    assert rows["mmau"]["b_only_correct"] == 12 - first_mmau and rows["mmau"]["a_only_correct"] == 0
    assert rows["mmau-test"]["items"] == 0  # withheld answers pair nothing
    assert comparison["all"]["items"] == 12 + 6 + 4 + 4
