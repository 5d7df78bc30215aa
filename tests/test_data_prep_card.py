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
        {"id": "clotho-a", "audio_path": "/d/a.wav", "duration": 1800.0, "domain": "sound", "source": "clotho", "licence": "CC BY",
         "licence_id": "CC-BY-4.0"},
        {"id": "clotho-b", "audio_path": "/d/b.wav", "duration": 1800.0, "domain": "sound", "source": "clotho", "licence": "CC0",
         "licence_id": "CC0-1.0"},
        {"id": "meld-c", "audio_path": "/d/c.wav", "duration": 3600.0, "domain": "speech", "source": "meld", "licence": "GPL-3.0"},
        {"id": "fma-d", "audio_path": "/d/d.wav", "duration": 7200.0, "domain": "music", "source": "fma", "licence": "CC BY"},
    ]
    write_jsonl(tmp_path / "collect.jsonl", manifest)
    (tmp_path / "collect.report.json").write_text(json.dumps({
        "stage": "collect", "in": 6, "out": 4, "rejected": {"unreadable_clip": 2}, "seconds": 1.5, "seed": 3,
        "mixture": {"clotho": {"available": 9, "wanted": 3, "moved": 2, "selected": 5, "shortfall": 0}},
        "scan": {"clotho": {"candidates": 9, "skipped": {"missing_clip": 4}, "duplicates": {"removed": 1, "kept_in": {"audioset": 1}},
                            "licence_refused": {"unknown": 2}}},
        "shortfall_rule": "redistribute",
    }))
    # A later stage's output: two questions on one meld clip and one on fma; its hours count clips once.
    qa = [dict(manifest[2], id="q1", question="?"), dict(manifest[2], id="q2", question="?"), dict(manifest[3], id="q3", question="?")]
    write_jsonl(tmp_path / "qa.jsonl", qa)
    (tmp_path / "qa.report.json").write_text(
        json.dumps({"stage": "qa", "in": 4, "out": 3, "rejected": {"malformed_reply": 2}, "seconds": 9.0}))

    card = build_card(tmp_path)
    assert card["data_file"].endswith("qa.jsonl")  # the newest stage output
    assert card["records"] == 3 and card["clips"] == 2 and card["hours"] == pytest.approx(3.0)
    assert card["by_source"]["meld"] == {"records": 2, "proportion": pytest.approx(0.6667, abs=1e-4), "clips": 1, "hours": 1.0,
                                         "licences": {"GPL-3.0": 2}, "licence_ids": {"unknown": 2}, "domains": {"speech": 2}}
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
    # the new columns: licence ids counted, clips the shortfall rule moved, duplicates removed, licence refusals
    assert "| clotho | 2 | 50.0 % | 2 | 1.00 | sound | CC BY; CC0 | CC-BY-4.0: 1, CC0-1.0: 1 |" in markdown
    assert "## Mixture (seed 3, shortfall rule: redistribute)" in markdown
    assert "| clotho | 9 | 3 | +2 | 5 | 0 | 1 (kept in audioset: 1) | unknown: 2 | missing_clip: 4 |" in markdown
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
    assert card["mixture"]["synthetic"] == {"available": 24, "wanted": 10, "moved": 0, "selected": 10, "shortfall": 0}
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



def test_card_shows_curation_statistics(tmp_path, synthetic_dir):
    """`card --curation FILE` (repeatable): items per label (audio reliance) or bucket (pass rates), mean pass rate."""
    reliance, stats = tmp_path / "audio_reliance.jsonl", tmp_path / "hard.stats.jsonl"
    write_jsonl(reliance, [{"id": "a", "label": "weak-audio"}, {"id": "b", "label": "audio-reliant"}, {"id": "c", "label": "weak-audio"}])
    write_jsonl(stats, [{"id": "a", "passes": 2, "samples": 8, "pass_rate": 0.25, "bucket": "in"},
                        {"id": "b", "passes": 0, "samples": 8, "pass_rate": 0.0, "bucket": "below"}])
    work = tmp_path / "work"
    assert cli(["card", str(REPO / "recipes" / "tiny.yaml"), "--data", str(synthetic_dir / "train.jsonl"), "--curation", str(reliance),
                "--curation", str(stats), f"data_prep.work_dir={work}"]) == 0
    card = json.loads((work / "data_card.json").read_text())
    assert card["curation"] == [
        {"path": str(reliance), "items": 3, "by": "label", "counts": {"audio-reliant": 1, "weak-audio": 2}, "mean_pass_rate": None},
        {"path": str(stats), "items": 2, "by": "bucket", "counts": {"below": 1, "in": 1}, "mean_pass_rate": 0.125}]
    assert f"| `{stats}` | 2 | bucket | below: 1, in: 1 | 0.125 |" in (work / "data_card.md").read_text()

# Audio-Cogito (arXiv 2604.12527) Table 1, stated here on its own: adapter name -> (ratio %, samples).
TABLE_1 = {
    "audioset": (32.53, 179_000), "clotho": (1.14, 6_000), "audiocaps": (7.20, 40_000), "complexaudio": (6.66, 37_000),
    "meld": (4.50, 24_000), "covost2": (10.10, 56_000), "dailytalk": (1.64, 9_000),
    "musicbench": (16.04, 88_000), "fma": (13.81, 76_000), "medley_solos": (6.38, 35_000),
}
PAPER_NAMES = {"AudioSet": "audioset", "Clotho": "clotho", "AudioCaps": "audiocaps", "ComplexAudio (from Audio-Reasoner)": "complexaudio",
               "MELD": "meld", "CoVoST 2": "covost2", "DailyTalk": "dailytalk", "MusicBench": "musicbench", "FMA": "fma",
               "Medley-solos-DB": "medley_solos"}


def test_cogito_recipe_mixture_is_table_1():
    from core.recipe import load_recipe
    from data_prep.collect import allocate

    config = load_recipe(REPO / "recipes" / "cogito_data.yaml").data_prep
    assert {s.name: (round(100 * s.ratio, 4), s.reference_samples) for s in config.sources} == TABLE_1
    # The ratios ask for exactly `total` clips, each source its share to within one clip.
    wanted = allocate(config.sources, {}, config.total)
    assert sum(wanted.values()) == config.total == 545_000
    assert all(abs(wanted[name] - pct / 100 * config.total) < 1 for name, (pct, _) in TABLE_1.items())

    # docs/audio_cogito.md, the project's copy of the paper's facts, must say the same
    doc = REPO / "docs" / "audio_cogito.md"
    rows = [line.split("|")[1:-1] for line in doc.read_text().splitlines() if line.startswith("| ") and "k |" in line]
    from_doc = {PAPER_NAMES[r[1].strip()]: (float(r[4]), int(r[3].strip()[:-1]) * 1000) for r in rows}
    assert from_doc == TABLE_1


def test_card_sets_the_mixture_against_the_recipe_and_shows_the_seed_pool(tmp_path):
    from core.recipe import DataPrepConfig

    config = DataPrepConfig(total=100, sources=[
        {"name": "clotho", "root": "x", "ratio": 0.75, "reference_samples": 6000},
        {"name": "meld", "root": "y", "ratio": 0.25, "reference_samples": 2000},
        {"name": "fma", "root": "z"},  # takes what it has: no target
    ])
    write_jsonl(tmp_path / "verify.jsonl", [{"id": f"c{i}", "source": "clotho"} for i in range(3)] + [{"id": "m", "source": "meld"}])
    (tmp_path / "collect.report.json").write_text(json.dumps({"stage": "collect", "mixture": {
        "clotho": {"available": 90, "wanted": 75, "selected": 60, "shortfall": 15},
        "meld": {"available": 30, "wanted": 25, "selected": 25, "shortfall": 0},
        "fma": {"available": 15, "wanted": 15, "selected": 15, "shortfall": 0}}}))
    (tmp_path / "qa.report.json").write_text(json.dumps({"stage": "qa", "seed_questions": "pool.jsonl", "seed_pool_size": 40,
                                                         "n_shots": 20, "max_questions": 3}))
    card = write_card(tmp_path, config=config)
    assert card["targets"] == {
        "clotho": {"target_share": 0.75, "reference_samples": 6000, "reference_share": 0.75, "selected_share": 0.6,
                   "records_share": 0.75},
        "meld": {"target_share": 0.25, "reference_samples": 2000, "reference_share": 0.25, "selected_share": 0.25,
                 "records_share": 0.25},
        "fma": {"target_share": None, "reference_samples": None, "reference_share": None, "selected_share": 0.15,
                "records_share": 0.0},
    }
    markdown = (tmp_path / "data_card.md").read_text()
    assert "| clotho | 75.00 % | 6,000 | 75.00 % | 60.00 % | 75.00 % |" in markdown
    assert "| fma | - | - | - | 15.00 % | 0.00 % |" in markdown
    assert "Seed pool `pool.jsonl`: **40 questions**; each QA call shows 20 of them" in markdown
    assert "up to 3" not in markdown and "1 to 3 questions" in markdown
