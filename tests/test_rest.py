"""The self-improvement loop (train/rest.py): its selection rule on hand-made pass rates, and one small iteration
end to end on the tiny kit, killed mid-iteration and resumed to the same bytes."""

import json
import shutil

import pytest
import yaml

from core.rest_files import iteration_data
from train import rest


def scored(item_id: str, correct: list[bool], tokens: list[int]) -> dict:
    return {"id": item_id, "passes": sum(correct), "samples": len(correct), "correct": correct, "tokens": tokens}


@pytest.mark.parametrize("passes, band", [(0, "none"), (1, "low"), (3, "low"), (4, "middle"), (11, "middle"),
                                          (12, "high"), (14, "high"), (15, "top"), (16, "top")])
def test_bands_are_the_published_ones_at_16_samples(passes, band):
    assert rest.band(passes, 16) == band


def test_bands_scale_with_the_share_of_passes():
    # K = 8: 1 (12.5 %) low; 2-5 (25-62.5 %) middle; 6-7 (75-87.5 %) high; 8 top. K = 2: 1 of 2 is middle.
    assert [rest.band(p, 8) for p in range(9)] == ["none", "low", "middle", "middle", "middle", "middle", "high", "high", "top"]
    assert [rest.band(p, 2) for p in range(3)] == ["none", "middle", "top"]


def test_learning_zone_keeps_exactly_what_it_says():
    tokens = [30, 10, 50, 20, 40, 60, 70, 80, 90, 15, 25, 35, 45, 55, 65, 75]
    scores = [
        scored("zero", [False] * 16, tokens),
        scored("low", [j in (2, 5, 7) for j in range(16)], tokens),  # 3 of 16: all three, weight 1
        scored("middle", [j < 6 for j in range(16)], tokens),  # 6 of 16: the 3 shortest correct (1: 10, 3: 20, 0: 30)
        scored("high", [j != 1 and j != 3 for j in range(16)], tokens),  # 14 of 16: the shortest correct (9: 15)
        scored("top", [True] * 16, tokens),  # 16 of 16: skipped at fraction 0
    ]
    kept = rest.select(scores, "learning_zone", shortest_k=3)
    assert [(k["id"], k["sample"], k["weight"], k["band"]) for k in kept] == [
        ("low", 2, 1.0, "low"), ("low", 5, 1.0, "low"), ("low", 7, 1.0, "low"),
        ("middle", 0, 1.5, "middle"), ("middle", 1, 1.5, "middle"), ("middle", 3, 1.5, "middle"),
        ("high", 9, 0.5, "high"),
    ]
    # the whole top band at fraction 1: its shortest sample (1: 10 tokens) at weight 0.5
    everything = rest.select(scores, "learning_zone", shortest_k=3, all_correct_fraction=1.0)
    assert everything[-1] == {"id": "top", "sample": 1, "weight": 0.5, "band": "top"} and len(everything) == 8
    # the options: every correct sample, or the k shortest, all at weight 1
    assert len(rest.select(scores, "all_correct")) == 3 + 6 + 14 + 16
    short = rest.select(scores, "shortest_k", shortest_k=2)
    assert [(k["id"], k["sample"]) for k in short if k["id"] in ("high", "top")] == [("high", 9), ("high", 10), ("top", 1), ("top", 9)]
    assert {k["weight"] for k in short} == {1.0}


def test_a_fraction_of_the_top_band_is_a_seeded_share():
    scores = [scored(f"t{i}", [True] * 4, [5, 6, 7, 8]) for i in range(400)]
    kept = rest.select(scores, "learning_zone", all_correct_fraction=0.25, seed=3)
    assert kept == rest.select(scores, "learning_zone", all_correct_fraction=0.25, seed=3)
    assert 70 < len(kept) < 130 and {k["sample"] for k in kept} == {0}


def test_only_correct_samples_that_can_be_targets_are_kept():
    from infer.engine import Generation
    from infer.parse import parse_output

    def sample(text, finished=True):
        return rest.trainable(Generation("x#0", text, (), 0, 1, finished, 0.0), parse_output(text, ["yes", "no"]))

    assert sample("<think>I hear it.</think> yes")
    assert not sample("<think>I hear it.</think> yes", finished=False)  # cut by max_new_tokens
    assert not sample("<think>I hear it and yes")  # the thinking never closed
    assert not sample("<think>I hear <|audio_pad|>.</think> yes")
    item = scored("a", [True, True, False, True], [5, 1, 1, 9]) | {"trainable": [True, False, True, True]}
    assert [k["sample"] for k in rest.select([item], "all_correct")] == [0, 3]
    assert [k["sample"] for k in rest.select([item], "learning_zone", shortest_k=1)] == [0]  # 3 of 4: high, the shortest


def test_histogram_counts_items_per_pass_count():
    scores = [scored("a", [True, False], [1, 1]), scored("b", [False, False], [1, 1]), scored("c", [True, False], [1, 1])]
    hist = rest.histogram(scores, 2)
    assert hist["passes"] == {"0": 1, "1": 2, "2": 0} and hist["bands"]["middle"] == 2 and hist["mean_pass_rate"] == 0.3333


@pytest.fixture
def loop_recipe(tmp_path, tiny_checkpoint, synthetic_dir):
    recipe = {
        "name": "test-rest",
        "model": {"path": str(tiny_checkpoint), "dtype": "float32"},
        "data": {"train": [{"path": str(synthetic_dir / "train.jsonl")}], "max_length": 1024},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "train": {"seed": 0, "warmup_ratio": 0.0, "batch_size": 1, "grad_accum": 1, "max_steps": 2, "save_every": 1},
        "rest": {"output_dir": str(tmp_path / "loop"), "max_items": 6, "samples": 2, "max_new_tokens": 6,
                 "batch_size": 4, "chunk_items": 2, "lrs": [1e-3], "selection": "all_correct", "final_histogram": False},
        "infer": {"meta": str(synthetic_dir / "test.jsonl"), "output": str(tmp_path / "answers" / "submission.jsonl"),
                  "adapter": str(tmp_path / "loop" / "iter-1" / "sft" / "adapter"), "batch_size": 2, "max_new_tokens": 4,
                  "do_sample": False, "limit": 2},
    }
    path = tmp_path / "rest.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def loop_files(folder) -> dict:
    """Every file the loop writes whole, by path; not the SFT's logs (timings), nor trained.json (seconds). peft
    writes an adapter's target_modules from a set, in an order that changes between processes: compared sorted."""
    skip = ("sft/metrics.jsonl", "sft/provenance", "sft/seen", "sft/checkpoints", "sft/data_cache", "trained.json")
    files = {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
             if p.is_file() and not any(s in str(p.relative_to(folder)) for s in skip)}
    for name in [n for n in files if n.endswith("adapter_config.json")]:
        config = json.loads(files[name])
        files[name] = {**config, "target_modules": sorted(config["target_modules"])}
    return files


def test_one_iteration_end_to_end_then_killed_and_resumed_to_the_same_files(loop_recipe, monkeypatch, one_torch_thread):
    from core.recipe import load_recipe

    # The random tiny model names no choice and closes no thinking: the answer rule is replaced by one that passes
    # every sample of the items whose answer is their first choice, so the pass rates (K of K, or 0) are known in
    # advance, and every sample may be a target.
    monkeypatch.setattr(rest, "is_correct", lambda prediction, answer, choices: answer == choices[0])
    monkeypatch.setattr(rest, "trainable", lambda generation, parsed: True)
    recipe = load_recipe(loop_recipe)
    items = rest.loop_items(recipe)
    first = {it.id for it in items if it.answer == it.choices[0]}
    assert 0 < len(first) < len(items) == 6

    summary = rest.run(recipe, log=lambda _: None)
    folder = rest.Path(recipe.rest.output_dir) / "iter-1"
    samples = [json.loads(line) for path in sorted((folder / "samples").glob("chunk-*.jsonl"))
               for line in path.read_text().splitlines()]
    assert len(samples) == 12 and len(list((folder / "samples").glob("chunk-*.jsonl"))) == 3
    assert all(s["correct"] == (s["id"] in first) for s in samples)
    hist = json.loads((folder / "histogram.json").read_text())
    assert hist["passes"] == {"0": 6 - len(first), "1": 0, "2": len(first)} and hist["adapter"] is None
    assert hist["bands"] == {"none": 6 - len(first), "low": 0, "middle": 0, "high": 0, "top": len(first)}
    # all_correct: both samples of each such item, weight 1, one record each (ids made unique by the sample index)
    data = [json.loads(line) for line in (folder / "data" / "weight-1.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in data) == sorted(f"{i}#{j}" for i in first for j in (0, 1))
    by_sample = {(s["id"], s["sample"]): s for s in samples}
    for record in data:
        item, sample = record["id"].split("#")
        assert record["thinking"] == by_sample[(item, int(sample))]["thinking"]
        assert record["rest"] == {"iteration": 1, "item": item, "sampled_with": {"adapter": None}, "sample": int(sample),
                                  "band": "top", "weight": 1.0}
    manifest = json.loads((folder / "data.json").read_text())
    assert manifest["kept_samples"] == 2 * len(first) and manifest["files"][0]["weight"] == 1.0
    sft = yaml.safe_load((folder / "sft_recipe.yaml").read_text())
    assert sft["train"]["lr"] == 1e-3 and sft["train"]["init_adapter"] is None and sft["train"]["output_dir"] == str(folder / "sft")
    assert sft["data"]["train"][0]["weight"] == 2 * len(first)
    assert (folder / "sft" / "adapter" / "adapter_config.json").is_file()
    assert summary["iterations"][0]["adapter"] == str(folder / "sft" / "adapter")
    assert iteration_data(recipe.rest.output_dir) == [folder / "data" / "weight-1.jsonl"]
    reference = loop_files(rest.Path(recipe.rest.output_dir))

    # killed after the first sampling chunk is written: the rerun redoes the rest and writes the same bytes
    loop = rest.Path(recipe.rest.output_dir)
    shutil.rmtree(loop)
    written = rest.write_records

    def killed_after_first_chunk(path, records):
        written(path, records)
        if path.name == "chunk-0000.jsonl":
            raise KeyboardInterrupt

    monkeypatch.setattr(rest, "write_records", killed_after_first_chunk)
    with pytest.raises(KeyboardInterrupt):
        rest.run(recipe, log=lambda _: None)
    assert [p.name for p in (folder / "samples").iterdir() if not p.name.startswith(".")] == ["chunk-0000.jsonl"]
    monkeypatch.setattr(rest, "write_records", written)
    rest.run(recipe, log=lambda _: None)
    assert loop_files(loop) == reference


def test_audio_reliance_labels_items_answered_without_the_audio(tmp_path):
    from eval.__main__ import main as eval_main
    from eval.reliance import item_labels, label_counts

    meta = [{"id": f"q{i}", "question": "?", "choices": ["yes", "no"], "answer": "yes", "sub-category": "T"} for i in range(4)]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))

    def submission(name, answers):
        (tmp_path / name).write_text("".join(json.dumps({"id": i, "thinking_prediction": "t", "answer_prediction": a}) + "\n"
                                             for i, a in answers.items()))
        return str(tmp_path / name)

    # q0 right both ways, q1 only with audio, q2 wrong both ways, q3 only without audio
    normal = submission("normal.jsonl", {"q0": "yes", "q1": "yes", "q2": "no", "q3": "no"})
    silent = submission("silent.jsonl", {"q0": "yes", "q1": "no", "q2": "no", "q3": "yes"})
    assert eval_main(["reliance", normal, silent, "--meta", str(tmp_path / "meta.jsonl"), "--items", str(tmp_path / "r.jsonl")]) == 0
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["id"], r["correct_with_audio"], r["correct_ablated"], r["label"]) for r in rows] == [
        ("q0", True, True, "weak-audio"), ("q1", True, False, "audio-reliant"), ("q2", False, False, "unsolved"),
        ("q3", False, True, "weak-audio")]
    partial = submission("partial.jsonl", {"q0": "yes"})
    assert label_counts(item_labels(normal, partial, tmp_path / "meta.jsonl")) == {
        "weak-audio": 1, "audio-reliant": 0, "unsolved": 0, "missing": 3}



def test_the_audit_bundle_of_an_iteration_declares_the_loops_data(loop_recipe, monkeypatch, one_torch_thread):
    from audit.bundle import BundleSources, build_bundle, sha256_file
    from core.recipe import load_recipe
    from infer.run import run as infer_run

    monkeypatch.setattr(rest, "is_correct", lambda prediction, answer, choices: answer == choices[0])
    monkeypatch.setattr(rest, "trainable", lambda generation, parsed: True)
    recipe = load_recipe(loop_recipe)
    rest.run(recipe, log=lambda _: None)
    infer_run(recipe)
    iteration = rest.Path(recipe.rest.output_dir) / "iter-1"
    bundle, _ = build_bundle(BundleSources(train_run=iteration / "sft", submission=rest.Path(recipe.infer.output),
                                           out=iteration.parent / "audit"))
    groups = json.loads((bundle / "checksums.json").read_text())
    data = iteration / "data" / "weight-1.jsonl"
    assert [(f["path"], f["sha256"]) for f in groups["rest_data"]["files"]] == [(str(data), sha256_file(data))]
    assert json.loads((bundle / "data" / "rest" / "iter-1.json").read_text()) == json.loads((iteration / "data.json").read_text())


def test_sft_goes_on_from_train_init_adapter(recipe_file, tmp_path, one_torch_thread):
    """The loop's iterations train the adapter that sampled: at a vanishing learning rate, SFT from
    train.init_adapter ends where that adapter was, and a fresh adapter does not."""
    from safetensors.torch import load_file

    from tests.test_train import run_sft

    first = run_sft(recipe_file)  # 3 steps at lr 1e-2: lora_B away from its zero start
    start = load_file(first / "adapter" / "adapter_model.safetensors")
    assert any(t.abs().max() > 0 for name, t in start.items() if "lora_B" in name)
    went_on = run_sft(recipe_file, f"train.output_dir={tmp_path / 'on'}", "train.max_steps=1", "train.lr=1e-12",
                      f"train.init_adapter={first / 'adapter'}")
    fresh = run_sft(recipe_file, f"train.output_dir={tmp_path / 'fresh'}", "train.max_steps=1", "train.lr=1e-12")
    on = load_file(went_on / "adapter" / "adapter_model.safetensors")
    new = load_file(fresh / "adapter" / "adapter_model.safetensors")
    assert on.keys() == start.keys()
    assert all((on[k] - start[k]).abs().max() < 1e-6 for k in start)
    assert any((new[k] - start[k]).abs().max() > 1e-3 for k in start)


def test_a_loop_folder_resumes_only_with_the_settings_that_made_it(loop_recipe):
    from core.recipe import RecipeError, load_recipe, save_recipe

    recipe = load_recipe(loop_recipe)
    save_recipe(recipe, rest.Path(recipe.rest.output_dir) / "recipe.yaml")
    for change in ("rest.temperature=0.5", "rest.chunk_items=3", "train.lr=1e-2"):
        with pytest.raises(RecipeError, match=change.split("=")[0]):
            rest.run(load_recipe(loop_recipe, [change]), log=lambda _: None)
    assert not (rest.Path(recipe.rest.output_dir) / "iter-1").exists()
