"""The data card on a small hand-made work dir, and the CLI end to end on the synthetic source."""

import json
from pathlib import Path

import pytest
import yaml

from data_prep.__main__ import main as cli
from data_prep.card import build_card, render_markdown, write_card

REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_card_numbers(tmp_path):
    manifest = [
        {"id": "clotho-a", "audio_path": "/d/a.wav", "duration": 1800.0, "domain": "sound", "source": "clotho", "licence": "CC BY"},
        {"id": "clotho-b", "audio_path": "/d/b.wav", "duration": 1800.0, "domain": "sound", "source": "clotho", "licence": "CC0"},
        {"id": "meld-c", "audio_path": "/d/c.wav", "duration": 3600.0, "domain": "speech", "source": "meld", "licence": "GPL-3.0"},
        {"id": "fma-d", "audio_path": "/d/d.wav", "duration": 7200.0, "domain": "music", "source": "fma", "licence": "CC BY"},
    ]
    write_jsonl(tmp_path / "collect.jsonl", manifest)
    (tmp_path / "collect.report.json").write_text(json.dumps({
        "stage": "collect", "in": 6, "out": 4, "rejected": {"unreadable_clip": 2}, "seconds": 1.5, "seed": 3,
        "mixture": {"clotho": {"available": 9, "wanted": 3, "selected": 3, "shortfall": 0}},
        "scan": {"clotho": {"candidates": 9, "skipped": {"missing_clip": 4}}},
    }))
    # A later stage's output: two questions on one meld clip and one on fma; its hours count clips once.
    qa = [dict(manifest[2], id="q1", question="?"), dict(manifest[2], id="q2", question="?"), dict(manifest[3], id="q3", question="?")]
    write_jsonl(tmp_path / "qa.jsonl", qa)
    (tmp_path / "qa.report.json").write_text(json.dumps({"stage": "qa", "in": 4, "out": 3, "rejected": {"malformed_reply": 2}, "seconds": 9.0}))

    card = build_card(tmp_path)
    assert card["data_file"].endswith("qa.jsonl")  # the newest stage output
    assert card["records"] == 3 and card["clips"] == 2 and card["hours"] == pytest.approx(3.0)
    assert card["by_source"]["meld"] == {"records": 2, "proportion": pytest.approx(0.6667, abs=1e-4), "clips": 1, "hours": 1.0,
                                         "licences": {"GPL-3.0": 2}, "domains": {"speech": 2}}
    assert card["by_domain"]["music"]["hours"] == 2.0
    assert list(card["stages"]) == ["collect", "qa"]
    assert card["stages"]["qa"]["rejected"] == {"malformed_reply": 2}

    manifest_card = write_card(tmp_path, tmp_path / "collect.jsonl")
    assert manifest_card["hours"] == pytest.approx(4.0)
    assert {k: v["proportion"] for k, v in manifest_card["by_source"].items()} == {"clotho": 0.5, "fma": 0.25, "meld": 0.25}
    assert manifest_card["by_source"]["clotho"]["licences"] == {"CC BY": 1, "CC0": 1}
    markdown = (tmp_path / "data_card.md").read_text()
    assert "| clotho | 2 | 50.0 % | 2 | 1.00 | sound | CC BY; CC0 |" in markdown
    assert "| collect | 6 | 4 | unreadable_clip: 2 | 1.5 |" in markdown
    assert "| clotho | 9 | 3 | 3 | 0 | missing_clip: 4 |" in markdown
    assert json.loads((tmp_path / "data_card.json").read_text()) == manifest_card
    assert render_markdown(manifest_card) == markdown


def test_cli_collect_and_card_on_the_tiny_recipe(tmp_path, synthetic_dir):
    work = tmp_path / "work"
    overrides = [f"data_prep.work_dir={work}", f"data_prep.sources=[{{name: synthetic, root: {synthetic_dir}, count: 10}}]"]
    assert cli(["collect", str(REPO / "recipes" / "tiny.yaml"), "--shard", "1/2", *overrides]) == 0
    assert not (work / "collect.jsonl").exists()  # shard 0/2 still to do
    assert cli(["collect", str(REPO / "recipes" / "tiny.yaml"), "--shard", "0/2", *overrides]) == 0
    manifest = [json.loads(l) for l in (work / "collect.jsonl").read_text().splitlines()]
    assert len(manifest) == 10 and all(r["source"] == "synthetic" and r["duration"] > 0.5 for r in manifest)
    resolved = yaml.safe_load((work / "resolved_recipe.yaml").read_text())
    assert resolved["data_prep"]["shard"] == "0/2" and resolved["data_prep"]["work_dir"] == str(work)
    assert cli(["card", str(REPO / "recipes" / "tiny.yaml"), *overrides]) == 0
    card = json.loads((work / "data_card.json").read_text())
    assert card["records"] == 10 and card["by_source"]["synthetic"]["proportion"] == 1.0
    assert card["mixture"]["synthetic"] == {"available": 24, "wanted": 10, "selected": 10, "shortfall": 0}
    assert card["hours"] == pytest.approx(sum(r["duration"] for r in manifest) / 3600, abs=1e-4)
    assert cli(["collect", str(REPO / "recipes" / "tiny.yaml"), "data_prep.sources=[{name: nope, root: x}]"]) == 2


def test_card_of_a_given_training_file_declares_its_sources(tmp_path, synthetic_dir):
    """`card --data FILE` declares what a run trained on (the audit's data_sources check reads it)."""
    work = tmp_path / "work"
    train_file = synthetic_dir / "train.jsonl"
    assert cli(["card", str(REPO / "recipes" / "tiny.yaml"), "--data", str(train_file), f"data_prep.work_dir={work}"]) == 0
    card = json.loads((work / "data_card.json").read_text())
    records = [json.loads(line) for line in train_file.read_text().splitlines()]
    assert card["data_file"] == str(train_file) and card["records"] == len(records) == 24
    assert list(card["by_source"]) == ["synthetic"]
    assert card["by_source"]["synthetic"]["licences"] == {"CC0-1.0 (generated by data_prep/synthetic.py)": 24}
    assert card["by_domain"].keys() == {"sound", "music"}
    assert card["hours"] == pytest.approx(sum(r["duration"] for r in records) / 3600, abs=1e-4)
    assert cli(["card", str(REPO / "recipes" / "tiny.yaml"), "--data"]) == 2  # the flag needs its value
