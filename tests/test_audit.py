"""Reproducibility audit on a tiny demo run: bundle, verify, tampering named, compliance failures reported."""

from __future__ import annotations

import json
import shutil
import tarfile
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml

from audit import compliance
from audit.__main__ import main as audit_cli
from audit.bundle import MANIFEST, sha256_file
from audit.verify import choose_ids, verify
from core.answer_rule import THINKING_LENGTH_LIMIT
from core.items import load_items
from core.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory, tiny_checkpoint, synthetic_dir, one_torch_thread):
    """A demo run of its own (files the tests alter): 3 training steps, greedy inference on 6 ids, data card, bundle."""
    from accelerate.state import AcceleratorState

    from data_prep.__main__ import main as data_prep_cli
    from infer.run import run
    from train.sft import main as sft_main

    root = tmp_path_factory.mktemp("audit-demo")
    checkpoint = Path(shutil.copytree(tiny_checkpoint, root / "tiny-omni"))
    train_file = root / "train.jsonl"
    shutil.copy(synthetic_dir / "train.jsonl", train_file)
    run_dir = root / "run"
    recipe = {
        "name": "audit-demo",
        "model": {"path": str(checkpoint), "dtype": "float32"},
        "data": {"train": [{"path": str(train_file), "audio_root": str(synthetic_dir)}], "max_length": 1024},
        # a gentle lr, no lm_head: 3 steps at 1e-2 make the tiny model (its BPE trained on the synthetic
        # words) write only "\n", its most frequent target token, leaving no reasoning to compare
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "train": {"output_dir": str(run_dir), "seed": 0, "lr": 1e-3, "warmup_ratio": 0.0, "batch_size": 4,
                  "grad_accum": 1, "max_steps": 3, "save_every": 100},
        # min_new_tokens: a barely trained random model would end its turn at once, leaving nothing to compare
        "infer": {"meta": str(synthetic_dir / "test.jsonl"), "output": str(run_dir / "submission.jsonl"),
                  "adapter": str(run_dir / "adapter"), "batch_size": 4, "max_new_tokens": 12, "min_new_tokens": 12,
                  "do_sample": False, "limit": 6},
        "data_prep": {"work_dir": str(run_dir / "data_prep"), "sources": [{"name": "synthetic", "root": str(synthetic_dir)}]},
    }
    recipe_file = root / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    AcceleratorState._reset_state(True)
    assert sft_main([str(recipe_file)]) == 0
    run(load_recipe(recipe_file))
    assert data_prep_cli(["collect", str(recipe_file)]) == 0 and data_prep_cli(["card", str(recipe_file)]) == 0
    bundle = root / "audit"
    assert audit_cli(["bundle", "--train-run", str(run_dir), "--infer-output", str(run_dir / "submission.jsonl"),
                      "--out", str(bundle)]) == 0
    return {"root": root, "run": run_dir, "bundle": bundle, "checkpoint": checkpoint, "train_file": train_file,
            "recipe": recipe_file}


def test_bundle_records_the_run(demo):
    bundle, run_dir = demo["bundle"], demo["run"]
    manifest = json.loads((bundle / MANIFEST).read_text())["files"]
    on_disk = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file() and p.name != MANIFEST)
    assert sorted(manifest) == on_disk
    assert all(sha256_file(bundle / rel) == record["sha256"] for rel, record in manifest.items())
    for rel in ("recipes/train.yaml", "recipes/infer.yaml", "submission/submission.jsonl", "submission/submission.run.json",
                "data/data_card.json", "environment/pip-freeze.txt", "environment/system.json", "commands.sh", "compliance.json"):
        assert rel in manifest, rel
    assert (bundle / "recipes/train.yaml").read_bytes() == (run_dir / "recipe.yaml").read_bytes()
    assert (bundle / "recipes/infer.yaml").read_bytes() == (run_dir / "submission.recipe.yaml").read_bytes()
    assert "torch==" in (bundle / "environment/pip-freeze.txt").read_text()
    system = json.loads((bundle / "environment/system.json").read_text())
    assert system["torch"] == torch.__version__ and system["cpu"]

    summary = json.loads((bundle / "audit.json").read_text())
    assert summary["seeds"]["train.seed"] == 0 and summary["sampling"]["do_sample"] is False
    assert len(summary["git"]["commit"]) == 40 and isinstance(summary["git"]["dirty"], bool)
    assert (bundle / "git/diff.patch").is_file() == summary["git"]["dirty"]
    # the commit recorded by train/sft.py as it ran, carried into the bundle
    assert "training/provenance.jsonl" in manifest
    assert [t["commit"] for t in summary["training_git"]] == [summary["git"]["commit"]]
    assert summary["compliance"] == {"prompt": "pass", "parsing": "pass", "submission": "pass", "decoding": "pass",
                                     "data_sources": "pass", "contamination": "skip"}

    groups = json.loads((bundle / "checksums.json").read_text())
    assert {"checkpoint", "adapter", "train_data", "submission", "data_card"} <= set(groups)
    adapter = {e["path"]: e["sha256"] for e in groups["adapter"]["files"]}
    assert adapter["adapter_model.safetensors"] == sha256_file(run_dir / "adapter" / "adapter_model.safetensors")
    assert groups["train_data"]["files"][0]["records"] == 24
    assert groups["train_data"]["files"][0]["sha256"] == sha256_file(demo["train_file"])

    commands = (bundle / "commands.sh").read_text()
    assert 'python train/sft.py "$BUNDLE/recipes/train.yaml"' in commands
    assert 'python -m infer run "$BUNDLE/recipes/infer.yaml"' in commands
    assert summary["git"]["commit"] in commands
    with tarfile.open(bundle.with_name("audit.tar.gz")) as tar:
        assert sorted(m.name for m in tar.getmembers() if m.isfile()) == sorted(f"audit/{p}" for p in [*manifest, MANIFEST])


def test_verify_passes_on_the_untouched_run(demo, capsys):
    report = verify(demo["bundle"], n_ids=4, device="cpu", seed=0, allow_paths=[demo["root"]])
    assert report.problems == []
    submitted = {json.loads(line)["id"]: json.loads(line) for line in (demo["run"] / "submission.jsonl").read_text().splitlines()}
    assert [row["id"] for row in report.rerun] == choose_ids(list(submitted), 4, 0)
    assert all(row["answer_match"] and row["reasoning_similarity"] == 1.0 for row in report.rerun)
    # something was compared (the random model may close its thinking at once on some items)
    assert any(submitted[row["id"]]["thinking_prediction"] for row in report.rerun)
    assert [c["status"] for c in report.compliance] == ["pass", "pass", "pass", "pass", "pass", "skip"]
    # the archive verifies the same way, from the command line
    assert audit_cli(["verify", str(demo["bundle"].with_name("audit.tar.gz")), "--ids", "0", "--allow-path", str(demo["root"])]) == 0
    assert "verify: OK" in capsys.readouterr().out


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # in the tensor data, past the safetensors header: the file still loads
    path.write_bytes(bytes(data))


def edit_line(path: Path, rid: str, **changes) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({**r, **changes} if r["id"] == rid else r) + "\n" for r in records))


@contextmanager
def restored(path: Path):
    original = path.read_bytes()
    try:
        yield path
    finally:
        path.write_bytes(original)


def first_checked_id(demo) -> str:
    ids = [json.loads(line)["id"] for line in (demo["run"] / "submission.jsonl").read_text().splitlines()]
    return choose_ids(ids, 1, 0)[0]


@pytest.mark.parametrize("case", ["checkpoint", "adapter", "submission", "data_shard", "bundle_submission"])
def test_verify_names_the_altered_file(demo, case, capsys):
    rid = first_checked_id(demo)
    shard = sorted(demo["checkpoint"].glob("model-*.safetensors"))[0]  # the checkpoint is sharded, as the real one
    target, alter, expected = {
        "checkpoint": (shard, flip_byte, [f"{shard} (checkpoint): sha256 differs"]),
        "adapter": (demo["run"] / "adapter" / "adapter_model.safetensors", flip_byte,
                    ["adapter_model.safetensors (adapter): sha256 differs"]),
        "submission": (demo["run"] / "submission.jsonl", lambda p: edit_line(p, rid, answer_prediction="tampered"),
                       [f"{demo['run'] / 'submission.jsonl'} (submission): sha256 differs"]),
        "data_shard": (demo["train_file"], lambda p: p.write_text(p.read_text().replace('"question": "', '"question": "So, ', 1)),
                       [f"{demo['train_file']} (train_data): sha256 differs"]),
        # the bundle's own copy: named by the manifest, and the greedy re-run disagrees with the edited line
        "bundle_submission": (demo["bundle"] / "submission" / "submission.jsonl",
                              lambda p: edit_line(p, rid, answer_prediction="tampered"),
                              ["bundle file submission/submission.jsonl: sha256 differs from MANIFEST.json",
                               f"submission.jsonl (id={rid}): answer_prediction: submitted 'tampered', greedy re-run"]),
    }[case]
    with restored(target):
        alter(target)
        code = audit_cli(["verify", str(demo["bundle"]), "--ids", "1", "--device", "cpu", "--seed", "0",
                          "--allow-path", str(demo["root"])])
        out = capsys.readouterr().out
    assert code == 1 and "verify: FAILED" in out
    mismatches = [line for line in out.splitlines() if line.startswith("MISMATCH")]
    for text in expected:
        assert any(text in line for line in mismatches), (text, mismatches)
    if case in ("checkpoint", "adapter"):
        assert "re-run: skipped" in out  # a re-run would test another model
    assert verify(demo["bundle"], n_ids=0, allow_paths=[demo["root"]]).problems == []  # restored: clean again


def test_compliance_reports_a_prompt_that_holds_the_category(demo, monkeypatch, capsys):
    import infer.run
    from infer.engine import Request

    honest = infer.run.item_request

    def leaky(item, tokenizer, prompt_style, max_audio_seconds):
        request = honest(item, tokenizer, prompt_style, max_audio_seconds)
        return Request(request.id, request.prompt.replace("Select one option", f"[{item.category}] Select one option"), request.audio)

    monkeypatch.setattr(infer.run, "item_request", leaky)
    assert audit_cli(["compliance", str(demo["bundle"])]) == 1
    out = capsys.readouterr().out
    assert "FAIL prompt" in out and "it holds the field(s) category" in out
    assert "PASS parsing" in out  # the other checks are unaffected


def test_compliance_reports_a_thinking_over_the_limit(demo, tmp_path, capsys):
    from infer.run import RunPaths

    original, copy = RunPaths.beside(demo["run"] / "submission.jsonl"), RunPaths.beside(tmp_path / "submission.jsonl")
    for src, dst in zip((original.submission, original.raw, original.run, original.recipe),
                        (copy.submission, copy.raw, copy.run, copy.recipe)):
        shutil.copy(src, dst)
    rid = first_checked_id(demo)
    edit_line(copy.submission, rid, thinking_prediction="x" * THINKING_LENGTH_LIMIT)
    assert audit_cli(["compliance", "--train-run", str(demo["run"]), "--infer-output", str(copy.submission)]) == 1
    out = capsys.readouterr().out
    assert "FAIL submission" in out and f"(id={rid}): thinking_prediction: {THINKING_LENGTH_LIMIT} characters, must be under" in out
    assert f"(id={rid}): thinking_prediction: not what string matching extracts" in out  # and it no longer parses back


def test_compliance_wants_declared_licences(tmp_path):
    card = tmp_path / "data_card.json"
    card.write_text(json.dumps({"by_source": {"clotho": {"records": 3, "licences": {"CC BY": 3}},
                                              "complexaudio": {"records": 2, "licences": {"unknown: set `licence`": 2}}}}))
    check = compliance.check_data_sources(card)
    assert check.status == "fail" and check.details == [f"{card}: by_source.complexaudio: no licence declared (['unknown: set `licence`'])"]
    assert compliance.check_data_sources(None).status == "fail"
    card.write_text(json.dumps({"by_source": {"clotho": {"records": 3, "licences": {"CC BY": 3}}}}))
    assert compliance.check_data_sources(card).status == "pass"


def test_compliance_runs_the_contamination_guard(demo, mmar_meta, tmp_path):
    recipe = load_recipe(demo["recipe"])
    assert compliance.check_contamination(recipe, mmar_meta).status == "pass"
    mmar = json.loads(mmar_meta.read_text().splitlines()[0])
    item = load_items(demo["train_file"], check_audio=False)[0]
    leaked = tmp_path / "leaked.jsonl"
    leaked.write_text(demo["train_file"].read_text() + json.dumps({**item.meta, "id": "copied", "question": mmar["question"]}) + "\n")
    dirty = load_recipe(demo["recipe"], [f"data.train=[{{path: {leaked}, audio_root: {recipe.data.train[0].audio_root}}}]"])
    check = compliance.check_contamination(dirty, mmar_meta)
    assert check.status == "fail" and check.details[0] == f"{leaked}:25 (id=copied): overlaps MMAR: question:{mmar['id']}"


def test_a_sampled_submission_is_reported_not_failed(demo):
    """verify decodes greedily: a sampled submission's differences are listed as expected, not failures."""
    from infer.run import run

    output = demo["root"] / "sampled" / "submission.jsonl"
    run(load_recipe(demo["recipe"], ["infer.do_sample=true", "infer.temperature=1.0", f"infer.output={output}"]))
    bundle = demo["root"] / "sampled-audit"
    assert audit_cli(["bundle", "--train-run", str(demo["run"]), "--infer-output", str(output), "--out", str(bundle)]) == 0
    report = verify(bundle, n_ids=3, device="cpu", allow_paths=[demo["root"]])
    assert report.problems == []
    assert any("decoded with sampling" in note for note in report.notes)
    assert any(row["reasoning_similarity"] < 1.0 for row in report.rerun)  # it did differ, and that was allowed
    assert any("thinking_prediction: similarity" in note for note in report.notes)


@pytest.fixture(scope="module")
def grpo_demo(demo, synthetic_dir, one_torch_thread):
    """GRPO from the demo's SFT adapter (2 steps of 2 prompts x 2 completions) on a file of its own, inference, bundle.
    Its recipe still names the demo's data.train: a GRPO run trains on its stages' data, not on that."""
    from accelerate.state import AcceleratorState

    from infer.run import run
    from train.grpo import main as grpo_main

    root = demo["root"] / "grpo"
    root.mkdir()
    grpo_file = root / "grpo.jsonl"
    grpo_file.write_text("".join((synthetic_dir / "train.jsonl").read_text().splitlines(keepends=True)[:8]))
    run_dir = root / "run"
    recipe = yaml.safe_load(demo["recipe"].read_text())
    recipe["train"] = {"output_dir": str(run_dir), "seed": 0, "lr": 1e-3, "batch_size": 2, "grad_accum": 1, "save_every": 100}
    recipe["grpo"] = {"init_adapter": str(demo["run"] / "adapter"), "num_generations": 2, "max_new_tokens": 8,
                      "rollout_batch_size": 4,
                      "stages": [{"name": "only", "data": [{"path": str(grpo_file), "audio_root": str(synthetic_dir)}],
                                  "steps": 2, "rewards": {"answer": 1.0, "format": 0.5}}]}
    recipe["infer"].update(output=str(run_dir / "submission.jsonl"), adapter=str(run_dir / "adapter"), limit=3)
    recipe_file = root / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(recipe))
    AcceleratorState._reset_state(True)
    assert grpo_main([str(recipe_file)]) == 0
    run(load_recipe(recipe_file))
    bundle = root / "audit"
    assert audit_cli(["bundle", "--train-run", str(run_dir), "--infer-output", str(run_dir / "submission.jsonl"),
                      "--out", str(bundle)]) == 0
    return {"run": run_dir, "bundle": bundle, "grpo_file": grpo_file}


def test_a_grpo_run_declares_its_stages_data_and_sft_start(demo, grpo_demo):
    bundle = grpo_demo["bundle"]
    groups = json.loads((bundle / "checksums.json").read_text())
    (data,) = groups["train_data"]["files"]
    assert (data["path"], data["declared_by"], data["records"]) == (str(grpo_demo["grpo_file"]), "grpo.stages.0.data (only)", 8)
    assert data["sha256"] == sha256_file(grpo_demo["grpo_file"])
    start = {e["path"]: e["sha256"] for e in groups["init_adapter"]["files"]}
    assert start["adapter_model.safetensors"] == sha256_file(demo["run"] / "adapter" / "adapter_model.safetensors")
    assert json.loads((bundle / "audit.json").read_text())["trainer"] == "grpo"
    commands = (bundle / "commands.sh").read_text()
    assert 'python train/grpo.py "$BUNDLE/recipes/train.yaml"' in commands
    assert f"# GRPO starts from the SFT adapter at grpo.init_adapter={demo['run'] / 'adapter'}" in commands
    assert verify(bundle, n_ids=1, device="cpu", allow_paths=[demo["root"]]).problems == []
    with restored(grpo_demo["grpo_file"]) as path:
        path.write_text(path.read_text().replace('"question": "', '"question": "So, ', 1))
        problems = verify(bundle, n_ids=0, allow_paths=[demo["root"]]).problems
        assert f"{path} (train_data): sha256 differs from the bundle's record (checksums.json)" in problems
    with restored(demo["run"] / "adapter" / "adapter_model.safetensors") as path:
        flip_byte(path)
        problems = verify(bundle, n_ids=0, allow_paths=[demo["root"]]).problems
        assert any("adapter_model.safetensors (init_adapter): sha256 differs" in p for p in problems)


def test_the_contamination_guard_reads_a_grpo_runs_stages_data(grpo_demo, mmar_meta):
    train = load_recipe(grpo_demo["bundle"] / "recipes" / "train.yaml")
    check = compliance.check_contamination(train, mmar_meta, compliance.trainer_of(grpo_demo["run"]))
    assert check.status == "pass" and check.details[0].startswith(f"{grpo_demo['grpo_file']}: 8 records, 0 overlap MMAR")
