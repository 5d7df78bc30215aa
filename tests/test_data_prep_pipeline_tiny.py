"""The Cogito-Pipe with the real engine (infer.engine.HFEngine) on the tiny random checkpoint.

The random model writes no valid JSON and no </think>, so what these runs show is the plumbing:
every stage loads its model through the recipe, generates, completes, counts its rejections
exactly, and the data card is written; the SFT file is valid (and empty).
"""

from __future__ import annotations

import json
from pathlib import Path

from core.items import read_jsonl
from core.recipe import load_recipe
from data_prep.__main__ import main as cli
from data_prep.cot import cot
from data_prep.stage import stage_paths
from data_prep.verify import verify

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "recipes" / "tiny.yaml"


def overrides(work: Path, synthetic_dir: Path, tiny_checkpoint: Path, clips: int = 4) -> list[str]:
    return [
        f"data_prep.work_dir={work}", f"data_prep.sources=[{{name: synthetic, root: {synthetic_dir}, count: {clips}}}]",
        f"model.path={tiny_checkpoint}", f"data_prep.qa.model={tiny_checkpoint}", f"data_prep.judge.model={tiny_checkpoint}",
        "data_prep.qa.max_attempts=2", "data_prep.qa.max_new_tokens=24", "data_prep.judge.max_new_tokens=12",
    ]


def report(work: Path, stage: str) -> dict:
    return json.loads(stage_paths(work, stage)["report"].read_text())


def test_cli_runs_every_stage_with_the_tiny_checkpoint(tmp_path, synthetic_dir, tiny_checkpoint):
    work = tmp_path / "work"
    args = overrides(work, synthetic_dir, tiny_checkpoint)
    for command in ("collect", "qa", "cot", "verify", "card"):
        assert cli([command, str(TINY), *args]) == 0, command
    qa = report(work, "qa")
    assert qa["in"] == 4 and qa["out"] == 0 and qa["rejected"] == {"qa_malformed": 4}
    assert sum(qa["counts"].values()) == 8  # two replies per clip, each malformed and counted by kind
    assert all(kind.startswith("malformed_reply:") for kind in qa["counts"])
    assert report(work, "cot")["in"] == 0 and report(work, "verify")["out"] == 0
    assert stage_paths(work, "verify")["output"].read_text() == ""  # a valid, empty SFT file
    card = json.loads((work / "data_card.json").read_text())
    assert card["data_file"].endswith("verify.jsonl") and card["records"] == 0
    assert card["stages"]["qa"]["rejected"] == {"qa_malformed": 4} and card["stages"]["qa"]["counts"] == qa["counts"]
    assert "| qa | 4 | 0 | qa_malformed: 4 |" in (work / "data_card.md").read_text()


def test_cot_and_judge_with_the_tiny_checkpoint(tmp_path, synthetic_dir, tiny_checkpoint):
    """Hand-written questions: the real Thinking stage and the real judge on them."""
    work = tmp_path / "work"
    recipe = load_recipe(TINY, overrides(work, synthetic_dir, tiny_checkpoint) + [
        "data_prep.cot.min_new_tokens=6", "data_prep.cot.max_new_tokens=6",  # the random model would stop at once
    ])
    work.mkdir()
    clips = [r for _, r in read_jsonl(synthetic_dir / "train.jsonl")][:3]
    questions = [{
        "id": f"q{i}", "clip_id": c["id"], "audio_path": str(synthetic_dir / c["audio_path"]), "duration": 1.0,
        "domain": "sound", "source": "synthetic", "licence": "Apache-2.0", "metadata": {"facts": c["facts"]},
        "question": c["question"], "choices": c["choices"], "answer": c["answer"],
    } for i, c in enumerate(clips)]
    stage_paths(work, "qa")["output"].write_text("".join(json.dumps(q) + "\n" for q in questions))

    distilled = cot(recipe, show_progress=False)
    assert distilled["in"] == 3 and distilled["out"] == 3
    outputs = [r for _, r in read_jsonl(stage_paths(work, "cot")["output"])]
    assert all(r["cot_tokens"] == 6 and not r["cot_finished"] for r in outputs)
    checked = verify(recipe, show_progress=False)
    assert checked["rejected"] == {"cot_truncated": 3} and checked["out"] == 0  # cut by the budget: the judge is not asked

    # Consistent reasoning reaches the real judge, whose random replies do not parse.
    judged = tmp_path / "judged"
    judged.mkdir()
    finished = [dict(r, cot_raw=f"<think>\nI hear it.\n</think>\n\n{r['answer']}", cot_finished=True) for r in outputs]
    stage_paths(judged, "cot")["output"].write_text("".join(json.dumps(r) + "\n" for r in finished))
    checked = verify(recipe.model_copy(update={"data_prep": recipe.data_prep.model_copy(update={"work_dir": str(judged)})}),
                     show_progress=False)
    assert checked["rejected"] == {"judge_unparseable": 3} and sum(checked["counts"].values()) == 3
