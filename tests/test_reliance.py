"""Audio reliance: infer.audio_ablation (infer/ablation.py) and `python -m eval reliance`."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.items import DataError, load_items
from core.recipe import load_recipe
from eval.reliance import markdown, reliance, reliance_figures
from infer.ablation import derangement, donors
from infer.engine import load_engine
from infer.run import run


def recipe_for(tiny_checkpoint, synthetic_dir, output, *extra):
    return load_recipe("recipes/tiny.yaml", [
        f"model.path={tiny_checkpoint}", f"infer.meta={synthetic_dir / 'test.jsonl'}", "infer.adapter=null",
        f"infer.output={output}", "infer.batch_size=4", "infer.max_new_tokens=2", "infer.min_new_tokens=2", *extra,
    ])


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, synthetic_dir, tmp_path_factory):
    return load_engine(recipe_for(tiny_checkpoint, synthetic_dir, tmp_path_factory.mktemp("e") / "s.jsonl"), device="cpu")


def heard(recipe, engine, monkeypatch) -> dict[str, np.ndarray]:
    """id -> the waveform each request of an `infer run` carried."""
    seen = {}
    generate = engine.generate_batches

    def spy(requests, sampling=None):
        seen.update({r.id: r.audio for r in requests})
        return generate(requests, sampling)

    monkeypatch.setattr(engine, "generate_batches", spy)
    run(recipe, engine)
    return seen


@pytest.mark.parametrize("n", [2, 3, 7, 120])
def test_derangement_moves_every_item_and_is_fixed_by_the_seed(n):
    order = derangement(n, seed=5)
    assert sorted(order) == list(range(n)) and all(order[i] != i for i in range(n))
    assert derangement(n, seed=5) == order
    with pytest.raises(ValueError, match="at least 2"):
        derangement(1, seed=0)


def test_silence_has_each_clips_length_and_swap_hears_another_items_clip(tiny_checkpoint, synthetic_dir, tmp_path,
                                                                        engine, monkeypatch):
    items = {it.id: it for it in load_items(synthetic_dir / "test.jsonl")}
    own = {rid: it.load_audio() for rid, it in items.items()}

    silent = heard(recipe_for(tiny_checkpoint, synthetic_dir, tmp_path / "silent.jsonl", "infer.audio_ablation=silence"),
                   engine, monkeypatch)
    assert set(silent) == set(items)
    assert all(len(silent[rid]) == len(own[rid]) and not silent[rid].any() for rid in items)
    assert json.loads((tmp_path / "silent.run.json").read_text())["audio_ablation"] == "silence"

    swapped = heard(recipe_for(tiny_checkpoint, synthetic_dir, tmp_path / "swap.jsonl", "infer.audio_ablation=swap"),
                    engine, monkeypatch)
    donor = donors(list(items.values()), "swap", seed=0)
    for rid in items:
        assert donor[rid].id != rid
        np.testing.assert_array_equal(swapped[rid], own[donor[rid].id])
    # an infer.limit run hears the same swapped clips as the whole run: the derangement is over the file
    first = heard(recipe_for(tiny_checkpoint, synthetic_dir, tmp_path / "swap4.jsonl", "infer.audio_ablation=swap",
                             "infer.limit=4"), engine, monkeypatch)
    assert len(first) == 4 and all(np.array_equal(first[rid], swapped[rid]) for rid in first)


def test_an_output_is_not_resumed_with_another_ablation(tiny_checkpoint, synthetic_dir, tmp_path, engine):
    run(recipe_for(tiny_checkpoint, synthetic_dir, tmp_path / "s.jsonl", "infer.limit=4"), engine)
    with pytest.raises(DataError, match="infer.audio_ablation"):
        run(recipe_for(tiny_checkpoint, synthetic_dir, tmp_path / "s.jsonl", "infer.audio_ablation=silence"), engine)


META = [{"id": f"q{i}", "question": "?", "choices": ["yes", "no"], "answer": "yes"} for i in range(10)]


def test_reliance_figures_and_the_flag():
    normal = {f"q{i}": "yes" for i in range(10)}  # 100 %; chance 50 %
    listens = reliance_figures(META, normal, {f"q{i}": "yes" if i < 5 else "no" for i in range(10)})
    assert (listens["accuracy"], listens["accuracy_ablated"], listens["chance"], listens["changed"]) == (100, 50, 50, 50)
    assert listens["reliance"] == 1.0 and not listens["hardly_drops"]
    # 90 % without the audio: a drop of 10 points, under a third of the 50-point gap above chance
    deaf = reliance_figures(META, normal, {f"q{i}": "yes" if i < 9 else "maybe" for i in range(10)})
    assert deaf["drop"] == pytest.approx(10) and deaf["reliance"] == pytest.approx(0.2) and deaf["hardly_drops"]
    # at chance there is no gap to lose: no flag, and the report says the test cannot tell
    at_chance = reliance_figures(META, {f"q{i}": "yes" if i < 5 else "no" for i in range(10)}, normal)
    assert at_chance["reliance"] is None and not at_chance["hardly_drops"]


def test_reliance_command_reads_submissions(tmp_path):
    meta = tmp_path / "meta.jsonl"
    meta.write_text("".join(json.dumps(r) + "\n" for r in META))
    for name, answers in (("a", ["yes"] * 10), ("b", ["yes"] * 9)):  # b lacks q9: left out of both
        (tmp_path / f"{name}.jsonl").write_text("".join(
            json.dumps({"id": f"q{i}", "thinking_prediction": "", "answer_prediction": a}) + "\n"
            for i, a in enumerate(answers)))
    result = reliance(tmp_path / "a.jsonl", tmp_path / "b.jsonl", meta)
    assert (result["items"], result["left_out"], result["drop"], result["hardly_drops"]) == (9, 1, 0.0, True)
    assert "FLAG" in markdown(result) and "1 items missing" in markdown(result)


class FakeEngine:
    """Answers the right choice when the clip is heard and the first choice on silence."""

    def __init__(self, items, tokenizer):
        self.tokenizer, self.by_id, self.heard = tokenizer, {it.id: it for it in items}, []

    def generate(self, requests, sampling):
        from infer.engine import Generation

        assert sampling.do_sample is False  # the probe answers greedily
        self.heard += [r.audio.any() for r in requests]
        return [Generation(r.id, f"<think>x</think>{self.by_id[r.id].answer if r.audio.any() else self.by_id[r.id].choices[0]}",
                           (), 0, 0, True, 0.0) for r in requests]


class FakeModel:
    def __init__(self):
        self.modes = []

    def eval(self):
        self.modes.append("eval")

    def train(self):
        self.modes.append("train")


def test_grpo_probe_every_n_steps(synthetic_dir, processor):
    from train.reliance_probe import RelianceProbe

    recipe = load_recipe("recipes/tiny.yaml", [f"infer.meta={synthetic_dir / 'test.jsonl'}", "grpo.reliance_every=2",
                                               "grpo.reliance_items=6"])
    probe = RelianceProbe.for_recipe(recipe)
    items = load_items(synthetic_dir / "test.jsonl")[:6]
    assert [it.id for it in probe.items] == [it.id for it in items]
    engine, model = FakeEngine(items, processor.tokenizer), FakeModel()
    assert probe.at(1, model, engine) == {} and engine.heard == []  # not a probe step
    figures = probe.at(2, model, engine)
    assert engine.heard == [True] * 6 + [False] * 6 and model.modes == ["eval", "train"]
    first_right = sum(it.answer == it.choices[0] for it in items)
    assert figures == pytest.approx({
        "reliance/accuracy": 100.0, "reliance/accuracy_silent": 100 * first_right / 6,
        "reliance/chance": 100 * sum(1 / len(it.choices) for it in items) / 6,
        "reliance/changed": 100 * (6 - first_right) / 6, "reliance/hardly_drops": 0.0})
    assert RelianceProbe.for_recipe(load_recipe("recipes/grpo_tiny.yaml")) is None  # off by default


def test_grpo_logs_the_probe(grpo_recipe, synthetic_dir, tmp_path):
    from tests.test_grpo import run_grpo
    from tests.test_train import metrics

    run_dir = run_grpo(grpo_recipe, f"train.output_dir={tmp_path}/rel", f"infer.meta={synthetic_dir / 'test.jsonl'}",
                       "grpo.reliance_every=2", "grpo.reliance_items=4", "grpo.iterations=1", "train.stop_after=2")
    first, second = metrics(run_dir)
    assert not any(key.startswith("reliance/") for key in first)
    items = load_items(synthetic_dir / "test.jsonl")[:4]
    assert second["reliance/chance"] == pytest.approx(100 * sum(1 / len(it.choices) for it in items) / 4)
    assert 0 <= second["reliance/accuracy_silent"] <= 100 and second["reliance/hardly_drops"] in (0.0, 1.0)
