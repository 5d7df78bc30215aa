"""Reliability, round two (issue 28): no command deletes a folder it did not make, one writer per training
folder, no bundle lies, no recipe or data set is silently short, no checkpoint counts unless whole."""

from __future__ import annotations

import errno
import hashlib
import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from core.recipe import RecipeError, load_recipe
from tests.test_reliability import run_sft
from train import sft

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tree_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def recipe_file(tmp_path, tiny_checkpoint, synthetic_dir):
    recipe = {
        "name": "outputs",
        "model": {"path": str(tiny_checkpoint), "dtype": "float32"},
        "data": {"train": [{"path": str(synthetic_dir / "train.jsonl")}], "max_length": 1024},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]},
        "train": {"output_dir": str(tmp_path / "run"), "seed": 0, "lr": 1e-3, "warmup_ratio": 0.0,
                  "batch_size": 1, "grad_accum": 1, "max_steps": 4, "save_every": 1, "keep_last": 2},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_checkpoint, synthetic_dir, one_torch_thread):
    """What `audit bundle` needs, without training: a run folder (recipe.yaml, metrics, an adapter file) and a
    greedy `infer run` of the base on 8 items; then its bundle."""
    from audit.bundle import BundleSources, build_bundle
    from core.recipe import save_recipe
    from data_prep.card import write_card
    from infer.run import run

    root = tmp_path_factory.mktemp("finished")
    run_dir = root / "run"
    recipe = load_recipe(None, [f"model.path={tiny_checkpoint}", "model.dtype=float32",
                                f"data.train=[{{path: {synthetic_dir / 'train.jsonl'}}}]", f"train.output_dir={run_dir}",
                                f"data_prep.work_dir={root / 'prep'}", f"infer.meta={synthetic_dir / 'test.jsonl'}",
                                f"infer.output={run_dir / 'submission.jsonl'}", "infer.adapter=null", "infer.batch_size=4",
                                "infer.max_new_tokens=4", "infer.do_sample=false", "infer.limit=8"])
    save_recipe(recipe, run_dir / "recipe.yaml")
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (run_dir / "adapter").mkdir()
    (run_dir / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    run(recipe)
    Path(recipe.data_prep.work_dir).mkdir()
    write_card(recipe.data_prep.work_dir, synthetic_dir / "train.jsonl", recipe.data_prep)
    bundle = root / "audit"
    build_bundle(BundleSources(train_run=run_dir, submission=run_dir / "submission.jsonl", out=bundle))
    return {"root": root, "run": run_dir, "bundle": bundle, "meta": synthetic_dir / "test.jsonl",
            "allow": [root, tiny_checkpoint, synthetic_dir]}  # what checksums.json records: all outside the repository


# ---------------------------------------------------------------- 1. nothing deletes a folder it did not make


def test_bundle_refuses_to_replace_a_folder_it_did_not_make(finished, tmp_path):
    from audit.__main__ import main as audit_cli

    run_dir = finished["run"]
    before = tree_digest(run_dir)
    args = ["bundle", "--train-run", str(run_dir), "--infer-output", str(run_dir / "submission.jsonl")]
    assert audit_cli([*args, "--out", str(run_dir)]) == 2  # the training run itself
    assert tree_digest(run_dir) == before
    from core.outdir import FolderRefused

    parent = tmp_path / "parent"
    (parent / "work").mkdir(parents=True)
    (parent / "work" / "notes.txt").write_text("mine")
    from audit.bundle import BundleSources, build_bundle

    with pytest.raises(FolderRefused, match=rf"^{parent}: a folder audit bundle did not make"):
        build_bundle(BundleSources(train_run=run_dir, submission=run_dir / "submission.jsonl", out=parent))
    assert (parent / "work" / "notes.txt").read_text() == "mine"
    assert not list(parent.parent.glob(".parent.partial-*"))  # refused before any staging folder
    # its own earlier bundle is replaced (a second bundle of the run), whole
    again = tmp_path / "again"
    shutil.copytree(finished["bundle"], again)
    assert audit_cli([*args, "--out", str(again)]) == 0
    assert json.loads((again / "MANIFEST.json").read_text())["files"].keys() == \
        json.loads((finished["bundle"] / "MANIFEST.json").read_text())["files"].keys()
    assert again.with_name("again.tar.gz").is_file() and not list(tmp_path.glob(".again.*"))


def test_merge_refuses_an_out_that_overlaps_its_inputs_or_is_not_its_own(tiny_checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model

    from core import qwen_omni as qo
    from train.merge import main as merge_cli
    from train.merge import merge

    model = qo.load_thinker(tiny_checkpoint, "float32")
    config = LoraConfig(r=2, lora_alpha=4, init_lora_weights=False, target_modules=qo.lora_target_names(model, ("q_proj",)))
    adapter = tmp_path / "adapter"
    get_peft_model(model, config).save_pretrained(adapter)
    before = tree_digest(adapter)
    assert merge_cli(["--base", str(tiny_checkpoint), "--adapter", str(adapter), "--out", str(adapter)]) == 2
    assert tree_digest(adapter) == before
    from core.outdir import MARKER, FolderRefused

    for out in (adapter, adapter / "merged", tmp_path):  # the adapter, inside it, above it
        with pytest.raises(FolderRefused, match=rf"^{out}: overlaps the adapter {adapter}"):
            merge(tiny_checkpoint, adapter, out)
    with pytest.raises(FolderRefused, match="overlaps the base checkpoint"):
        merge(tiny_checkpoint, adapter, tiny_checkpoint)
    assert tree_digest(adapter) == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(FolderRefused, match=rf"^{other}: a folder train/merge.py did not make"):
        merge(tiny_checkpoint, adapter, other)
    assert (other / "keep.txt").read_text() == "mine"
    merged = merge(tiny_checkpoint, adapter, tmp_path / "merged")
    assert (merged / MARKER).read_text() == "train/merge.py\n"
    shards = tree_digest(merged)
    assert merge(tiny_checkpoint, adapter, merged) == merged and tree_digest(merged) == shards  # its own: replaced


# ---------------------------------------------------------------- 2. one training run per output folder


def test_a_second_training_run_on_the_same_output_dir_fails_at_once_naming_it(recipe_file, tmp_path, capsys):
    from accelerate.state import AcceleratorState

    from core.locks import file_lock
    from train import runtime

    run, LOCK = tmp_path / "run", "train.lock"
    with file_lock(run / LOCK, wait=False, note="pid 4242 on host-a, since 2026-01-01 00:00:00: train/sft.py lr=3e-3"):
        AcceleratorState._reset_state(True)
        assert runtime.cli(sft.main, [str(recipe_file)]) == 1
    err = capsys.readouterr().err
    assert f"error: {run}: another training run is writing this train.output_dir " \
           "(pid 4242 on host-a, since 2026-01-01 00:00:00: train/sft.py lr=3e-3)" in err
    assert sorted(p.name for p in run.iterdir()) == [LOCK]  # no recipe, metrics or checkpoint written
    assert runtime.LOCK == LOCK and run_sft(recipe_file, "train.max_steps=1") == 0  # released: the next run goes ahead
    assert (run / LOCK).read_text() == ""  # the holder's note is cleared when it ends


@pytest.mark.slow  # two ranks under `accelerate launch`, as `make train` runs them
def test_every_rank_of_a_launch_stops_when_the_output_dir_is_taken(recipe_file, tmp_path):
    """Rank 0 tries the lock and tells the others; on the CPU launch Accelerate labels each rank as not
    distributed, where its own broadcast does nothing and rank 1 would train on alone."""
    import os
    import sys

    from core.locks import file_lock

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    with file_lock(run / "train.lock", wait=False, note="pid 4242 on host-a: the first run"):
        done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                               str(REPO / "recipes" / "accelerate" / "cpu_ddp_2proc.yaml"), "train/sft.py", str(recipe_file)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert done.stderr.count(f"error: {run}: another training run is writing this train.output_dir "
                             "(pid 4242 on host-a: the first run)") == 2  # both ranks, one line each
    assert sorted(p.name for p in run.rglob("*")) == ["train.lock"]  # neither rank wrote anything


# ---------------------------------------------------------------- 3. verify cross-checks every copy


def rehash(bundle: Path) -> None:
    from audit.bundle import write_manifest

    write_manifest(bundle)


def test_verify_fails_a_bundle_edited_outside_the_rerun_ids_and_rehashed(finished, tmp_path):
    from audit.verify import choose_ids, render, verify
    from infer.parse import parse_output

    bundle = Path(shutil.copytree(finished["bundle"], tmp_path / "audit"))
    submission, raw = bundle / "submission" / "submission.jsonl", bundle / "submission" / "submission.raw.jsonl"
    records = [json.loads(line) for line in submission.read_text().splitlines()]
    raws = {r["id"]: r for r in map(json.loads, raw.read_text().splitlines())}
    choices = {r["id"]: r["choices"] for r in map(json.loads, finished["meta"].read_text().splitlines())}
    checked = set(choose_ids([r["id"] for r in records], 2, seed=5))
    edited = [r["id"] for r in records if r["id"] not in checked][:4]
    for r in records:  # a wrong answer, its raw output to match: the parsing check re-derives the same line
        if r["id"] in edited:
            wrong = next(c for c in choices[r["id"]] if c != r["answer_prediction"])
            raws[r["id"]]["raw_output"] = f"<think>\nI hear it.\n</think>\n\n{wrong}"
            parsed = parse_output(raws[r["id"]]["raw_output"], choices[r["id"]])
            r.update(thinking_prediction=parsed.thinking, answer_prediction=parsed.answer)
    submission.write_text("".join(json.dumps(r) + "\n" for r in records))
    raw.write_text("".join(json.dumps(r) + "\n" for r in raws.values()))
    rehash(bundle)
    report = verify(bundle, n_ids=2, device="cpu", seed=5, allow_paths=finished["allow"])
    assert {row["id"] for row in report.rerun} == checked and all(row["answer_match"] for row in report.rerun)
    assert report.problems == [
        f"bundle file submission/{name}: sha256 differs from checksums.json's record of {finished['run'] / name} "
        "(changed after bundling)" for name in ("submission.jsonl", "submission.raw.jsonl")]
    assert report.rerun_seed == 5 and "re-run ids drawn with --seed 5" in render(report)


def test_rerun_ids_are_drawn_with_a_seed_recorded_in_the_report(finished):
    from audit.verify import choose_ids, verify

    ids = [f"id-{i}" for i in range(50)]
    assert choose_ids(ids, 8, 1) == choose_ids(list(reversed(ids)), 8, 1)  # the order given does not matter
    assert len({tuple(choose_ids(ids, 8, seed)) for seed in range(5)}) == 5
    first, second = (verify(finished["bundle"], n_ids=1, device="cpu", allow_paths=finished["allow"]) for _ in range(2))
    assert first.problems == [] and second.problems == []
    assert isinstance(first.rerun_seed, int) and first.to_dict()["rerun_seed"] == first.rerun_seed
    assert first.rerun_seed != second.rerun_seed  # random unless given (a 1 in 2**32 clash)


@pytest.mark.parametrize("where", ["absolute", "dotdot", "entry"])
def test_verify_refuses_recorded_paths_outside_the_repository(finished, tmp_path, where, monkeypatch):
    from audit.verify import render, verify

    secret = tmp_path / "ssh"
    secret.mkdir()
    (secret / "id_ed25519_private").write_text("key")
    bundle = Path(shutil.copytree(finished["bundle"], tmp_path / "audit"))
    groups = json.loads((bundle / "checksums.json").read_text())
    monkeypatch.chdir(tmp_path / "audit")
    root = {"absolute": str(secret), "dotdot": "../ssh", "entry": "."}[where]
    groups["planted"] = {"root": root, "files": [{"path": "../ssh/id_ed25519_private" if where == "entry" else "known",
                                                  "sha256": "0" * 64, "bytes": 3}]}
    (bundle / "checksums.json").write_text(json.dumps(groups))
    rehash(bundle)
    report = verify(bundle, n_ids=0, allow_paths=finished["allow"])
    refused = [p for p in report.problems if p.startswith("checksums.json: planted: ")]
    assert len(refused) == 1 and "outside the repository (absolute or '..'); refused, not read" in refused[0]
    assert "id_ed25519_private" not in render(report).replace(refused[0], "")  # never listed as found


# ---------------------------------------------------------------- 7. a key written twice in a recipe


def test_a_recipe_key_written_twice_is_an_error_naming_both_lines(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("train:\n  epochs: 6\n  batch_size: 8\nlora:\n  r: 8\ntrain:\n  epochs: 1\n")
    with pytest.raises(RecipeError, match=rf"^{recipe}: key 'train' written twice \(lines 1 and 6\)"):
        load_recipe(recipe)
    recipe.write_text("train:\n  lr: 1.0e-4\n  epochs: 2\n  lr: 3.0e-3\n")
    with pytest.raises(RecipeError, match=r"key 'lr' written twice \(lines 2 and 4\)"):
        load_recipe(recipe)
    recipe.write_text("base: &b {lr: 1.0e-4}\ntrain:\n  <<: *b\n  epochs: 2\n")  # a merge key may be overridden
    with pytest.raises(RecipeError, match=r"base: Extra inputs"):  # (an unknown section, but no duplicate)
        load_recipe(recipe)
    with pytest.raises(RecipeError, match=r"key 'a' written twice"):
        load_recipe(None, ["train.lr={a: 1, a: 2}"])


# ---------------------------------------------------------------- 8. checkpoints: whole or not counted


def fake_checkpoint(out: Path, step: int, state: str | None, complete: bool) -> Path:
    from train.runtime import COMPLETE, STATE_FILE

    path = out / "checkpoints" / f"step-{step}"
    path.mkdir(parents=True)
    if state is not None:
        (path / STATE_FILE).write_text(state)
    if complete:
        (path / COMPLETE).write_text("")
    return path


def test_only_complete_checkpoints_with_a_readable_state_count(tmp_path):
    from train.runtime import checkpoints

    good = fake_checkpoint(tmp_path, 2, '{"step": 2}', True)
    empty = fake_checkpoint(tmp_path, 4, "", True)  # a full disk while trainer_state.json was written
    unmarked = fake_checkpoint(tmp_path, 5, '{"step": 5}', False)  # killed before the marker
    warnings = []
    assert checkpoints(tmp_path, warn=warnings.append) == [good]
    assert [re.search(r"checkpoints/step-\d+", w).group() for w in warnings] == ["checkpoints/step-4", "checkpoints/step-5"]
    assert all("incomplete or corrupt checkpoint" in w for w in warnings)
    assert empty.is_dir() and unmarked.is_dir()


def saving_accelerator(save_state=lambda path, **_: Path(path).mkdir(parents=True, exist_ok=True)):
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType.NO, is_main_process=True, save_state=save_state,
                           wait_for_everyone=lambda: None)


@pytest.mark.parametrize("failure", ["torch", "enospc"])
def test_a_full_disk_while_checkpointing_is_a_named_error_and_no_checkpoint(tmp_path, monkeypatch, failure):
    from core.outdir import DiskFull
    from train import runtime

    monkeypatch.setattr(runtime, "save_adapter", lambda *a: None)
    accelerator = saving_accelerator()
    if failure == "torch":
        def full(path, **_):
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4352 vs 4240")

        accelerator.save_state, target = full, tmp_path / "checkpoints" / "step-3"
    else:
        real = Path.write_text

        def full(self, *a, **k):
            if self.name.startswith(f".{runtime.STATE_FILE}"):
                raise OSError(errno.ENOSPC, "No space left on device", str(self))
            return real(self, *a, **k)

        monkeypatch.setattr(Path, "write_text", full)
        target = tmp_path / "checkpoints" / "step-3" / f".{runtime.STATE_FILE}.partial-"
    with pytest.raises(DiskFull, match=rf"^{re.escape(str(target))}.*: the disk is full \(no space left on device\) "
                                       r"while writing checkpoint step-3"):
        runtime.save_checkpoint(accelerator, None, tmp_path, 3, keep_last=2, state={})
    assert runtime.checkpoints(tmp_path) == []


def test_a_resume_skips_a_checkpoint_whose_state_is_empty(recipe_file, tmp_path, capsys):
    from train.runtime import STATE_FILE

    run = tmp_path / "run"
    assert run_sft(recipe_file, "train.stop_after=3") == 0
    (run / "checkpoints" / "step-3" / STATE_FILE).write_bytes(b"")  # the disk filled as it was written
    capsys.readouterr()
    assert run_sft(recipe_file) == 0
    err = "".join(capsys.readouterr())
    assert f"warning: {run / 'checkpoints' / 'step-3'}: incomplete or corrupt checkpoint" in err
    assert f"resume: from {run}/checkpoints/step-2" in err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4] and (run / "adapter" / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-3", "step-4"]  # rewritten whole
    assert json.loads((run / "checkpoints" / "step-3" / STATE_FILE).read_text())["step"] == 3


# ---------------------------------------------------------------- 12. an interrupted `make data` is not done


def test_an_interrupted_synthetic_build_leaves_no_test_file(tmp_path, monkeypatch, synthetic_dir):
    from data_prep import synthetic

    real = synthetic.generate_split

    def killed_at_pretrain(out_dir, split, count, seed, *hard):
        if split == "pretrain":
            raise KeyboardInterrupt
        return real(out_dir, split, count, seed, *hard)

    out = tmp_path / "synthetic"
    monkeypatch.setattr(synthetic, "generate_split", killed_at_pretrain)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(out, train=6, test=6, pretrain=6)
    assert not (out / "test.jsonl").exists()  # make's target: the next `make data` runs again
    shutil.copy(synthetic_dir / "test.jsonl", out / "test.jsonl")  # a finished earlier build, then a killed one
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate(out, train=6, test=6, pretrain=6)
    assert not (out / "test.jsonl").exists()
    monkeypatch.setattr(synthetic, "generate_split", real)
    synthetic.generate(out, train=24, test=12)
    assert tree_digest(out) == tree_digest(synthetic_dir)  # the same bytes as ever
    assert "data: $(SYNTH)/test.jsonl" in (REPO / "Makefile").read_text()


# ---------------------------------------------------------------- 14. no test skips for want of data


def test_no_test_skips_for_want_of_a_file_outside_the_repository():
    """Skips are for a missing device or program (CUDA, vLLM, a browser: reported by `-ra`), never for
    missing data: the MMAR tests run on the checked-in sample (tests/data/mmar_sample.jsonl), and a
    missing MMAR_META is an error."""
    tracked = subprocess.run(["git", "ls-files", "tests"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    skip = re.compile(r"pytest\.(?:skip|importorskip)\(|skipif\(|mark\.skip\(|xfail")
    data = re.compile(r"shared|MMAR|meta|\.jsonl|\.wav|is_file\(|exists\(|is_dir\(|glob\(", re.I)
    found = 0
    for name in tracked:
        if not name.endswith(".py") or name == "tests/test_reliability_outputs.py":
            continue
        lines = (REPO / name).read_text().splitlines()
        assert not any("../shared" in line for line in lines), name
        for i, line in enumerate(lines):
            if skip.search(line):
                found += 1
                condition = "\n".join(lines[max(0, i - 2):i + 2])  # the skip and the test that guards it
                assert not data.search(condition), f"{name}:{i + 1}: a skip that depends on data:\n{condition}"
    assert found >= 2  # the gpu marker (conftest) and the vllm marker at least: the scan sees them
    conftest = (REPO / "tests" / "conftest.py").read_text()
    assert 'pytest.mark.skip(reason="needs a CUDA device")' in conftest and '"gpu" in item.keywords' in conftest
    assert "raise FileNotFoundError" in conftest and (REPO / "tests" / "data" / "mmar_sample.jsonl").is_file()
