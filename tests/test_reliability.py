"""Reliability (issue 15): no silent wrong result, no leaked secret, no lost or mixed work."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from core.items import DataError, load_items

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def recipe_file(tmp_path, tiny_checkpoint, synthetic_dir):
    recipe = {
        "name": "reliability",
        "model": {"path": str(tiny_checkpoint), "dtype": "float32"},
        "data": {"train": [{"path": str(synthetic_dir / "train.jsonl")}], "max_length": 1024},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj", "lm_head"]},
        "train": {"output_dir": str(tmp_path / "run"), "seed": 0, "lr": 1e-2, "warmup_ratio": 0.0,
                  "batch_size": 1, "grad_accum": 1, "max_steps": 6, "save_every": 1, "keep_last": 2},
        "infer": {"meta": str(synthetic_dir / "test.jsonl"), "output": str(tmp_path / "infer" / "submission.jsonl"),
                  "batch_size": 4, "max_new_tokens": 4, "do_sample": False, "limit": 4},
    }
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def run_sft(recipe_file: Path, *overrides: str) -> int:
    from accelerate.state import AcceleratorState

    from train.sft import main

    AcceleratorState._reset_state(True)  # each in-process run gets a fresh Accelerator
    return main([str(recipe_file), *overrides])


def nan_set(tmp_path: Path, synthetic_dir: Path) -> Path:
    """The synthetic training set with every clip replaced by a float WAV of NaNs."""
    records = [json.loads(line) for line in (synthetic_dir / "train.jsonl").read_text().splitlines()]
    bad = tmp_path / "nan.wav"
    sf.write(str(bad), np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    for r in records:
        r["audio_path"] = str(bad)
    path = tmp_path / "nan.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


# ---------------------------------------------------------------- 1. non-finite audio and loss


def test_nan_audio_is_a_data_error_naming_file_and_id(tmp_path, synthetic_dir, recipe_file):
    path = nan_set(tmp_path, synthetic_dir)
    item = load_items(path)[2]
    with pytest.raises(DataError, match=rf"{path}:3 \(id={item.id}\): audio_path: .*nan.wav: audio holds non-finite"):
        item.load_audio()
    with pytest.raises(DataError, match=rf"{path}:\d+ \(id=syn-train-\d+-\w+\): audio_path: .*non-finite"):
        run_sft(recipe_file, f"data.train=[{{path: {path}}}]")
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.fixture
def nan_from_third_batch(monkeypatch):
    """Batches 3, 4, ... carry NaN features: the loss turns NaN from optimizer step 3 on."""
    from train.data import SFTCollator

    calls = []
    real = SFTCollator.__call__

    def poisoned(self, rows):
        batch = real(self, rows)
        calls.append(1)
        if len(calls) >= 3:
            batch["input_features"] = torch.full_like(batch["input_features"], float("nan"))
        return batch

    monkeypatch.setattr(SFTCollator, "__call__", poisoned)
    return calls


def test_nonfinite_loss_stops_before_any_checkpoint_is_written_or_deleted(recipe_file, tmp_path, nan_from_third_batch):
    from train.runtime import TrainingError

    with pytest.raises(TrainingError, match=r"step 3: loss nan.*stopped before any update or checkpoint.*step-2"):
        run_sft(recipe_file)
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert not (run / "adapter").exists()
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in steps] == [1, 2] and all(math.isfinite(m["loss"]) for m in steps)


def test_nonfinite_steps_can_be_skipped_up_to_a_limit(recipe_file, tmp_path, nan_from_third_batch):
    from safetensors.torch import load_file

    from train.runtime import TrainingError

    assert run_sft(recipe_file, "train.max_nonfinite_steps=4") == 0
    run = tmp_path / "run"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert "NaN" not in "".join(lines)  # strict JSON: null, not a bare NaN
    steps = [json.loads(line) for line in lines]
    assert [m["skipped"] for m in steps] == [False, False, True, True, True, True]
    assert [m["loss"] is None for m in steps] == [False, False, True, True, True, True]
    # skipped steps update nothing: the adapter after step 5 is the final one, and finite
    final = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    at_5 = load_file(str(run / "checkpoints" / "step-5" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() and torch.equal(t, at_5[k]) for k, t in final.items())
    assert json.loads((run / "checkpoints" / "step-6" / "trainer_state.json").read_text())["nonfinite_skipped"] == 4
    nan_from_third_batch.clear()
    with pytest.raises(TrainingError, match=r"step 5: .*\(2 skipped before, train.max_nonfinite_steps=2\)"):
        run_sft(recipe_file, f"train.output_dir={tmp_path}/limited", "train.max_nonfinite_steps=2")


# ---------------------------------------------------------------- 2. no secret in any output

PLANTED = "sk-planted-0123456789abcdefABCDEF"


def planted_repo(root: Path) -> Path:
    """A git checkout holding credentials the usual ways: an untracked .env, a key file, a token in a
    notes file, and a tracked file edited to hold the key."""
    import subprocess

    repo = root / "repo"
    repo.mkdir()
    git = lambda *a: subprocess.run(["git", *a], cwd=repo, check=True, capture_output=True)  # noqa: E731
    git("init", "-q")
    (repo / "settings.py").write_text("MODEL = 'tiny'\n")
    git("add", "settings.py")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "init")
    (repo / "settings.py").write_text(f"MODEL = 'tiny'\nOPENAI_API_KEY={PLANTED}\n")
    (repo / ".env").write_text(f"OPENAI_API_KEY={PLANTED}\n")
    (repo / "deploy.pem").write_text(f"-----BEGIN PRIVATE KEY-----\n{PLANTED}\n-----END PRIVATE KEY-----\n")
    (repo / "notes.txt").write_text(f"curl -H 'Authorization: Bearer {PLANTED}' https://api.openai.com\n")
    return repo


def every_output_text(root: Path) -> str:
    """The bytes of every file under `root`, tarballs unpacked, as one string."""
    import tarfile

    texts = []
    for path in sorted(root.rglob("*")) if root.is_dir() else [root]:
        if path.is_file():
            texts.append(path.read_bytes().decode("utf-8", "replace"))
            if path.name.endswith(".tar.gz"):
                with tarfile.open(path) as tar:
                    texts += [tar.extractfile(m).read().decode("utf-8", "replace") for m in tar.getmembers() if m.isfile()]
    return "\n".join(texts)


def test_a_planted_key_reaches_no_output_of_train_infer_eval_audit(recipe_file, tmp_path, synthetic_dir, monkeypatch, capsys):
    from audit.__main__ import main as audit_cli
    from core import provenance
    from core.recipe import load_recipe
    from eval.__main__ import main as eval_cli
    from infer.run import run
    from tests.test_eval_http import ChatServer

    repo = planted_repo(tmp_path)
    monkeypatch.setattr(provenance, "REPO", repo)
    monkeypatch.setenv("OPENAI_API_KEY", PLANTED)
    state, patch = provenance.git_state()
    assert sorted(state["secret_files_left_out"]) == [".env", "deploy.pem"]
    notes = next(u for u in state["untracked"] if u["path"] == "notes.txt")
    assert len(notes["sha256"]) == 64 and notes["bytes"] == (repo / "notes.txt").stat().st_size
    assert "settings.py" in patch and "OPENAI_API_KEY=[REDACTED]" in patch and "notes.txt" not in patch
    (tmp_path / "venv").mkdir()
    (repo / ".venv").symlink_to(tmp_path / "venv")  # a shared environment linked in: recorded by its target, not read
    link = next(u for u in provenance.git_state()[0]["untracked"] if u["path"] == ".venv")
    assert link == {"path": ".venv", "symlink": str(tmp_path / "venv")}

    run_dir = tmp_path / "run"
    assert run_sft(recipe_file, "train.max_steps=2", "train.save_every=1") == 0
    recipe = load_recipe(recipe_file, [f"infer.output={run_dir}/submission.jsonl", f"infer.adapter={run_dir}/adapter"])
    run(recipe)
    # eval: every answer right, so the judge is asked; it refuses the key and echoes it, as OpenAI's 401/400 do
    meta = [json.loads(line) for line in (synthetic_dir / "test.jsonl").read_text().splitlines()][:3]
    (tmp_path / "meta.jsonl").write_text("".join(json.dumps(r) + "\n" for r in meta))
    (tmp_path / "right.jsonl").write_text("".join(json.dumps(
        {"id": r["id"], "thinking_prediction": "t", "answer_prediction": r["answer"]}) + "\n" for r in meta))
    with ChatServer() as server:
        server.default = (400, json.dumps({"error": {"message": f"Incorrect API key provided: {PLANTED}"}}).encode(), 0.0)
        code = eval_cli(["score", str(recipe_file), f"eval.meta={tmp_path}/meta.jsonl", f"eval.submission={tmp_path}/right.jsonl",
                         f"eval.report_dir={tmp_path}/eval", "eval.judge.backend=openai", f"eval.judge.base_url={server.url}",
                         "eval.judge.ratings=1", "eval.judge.max_attempts=1", f"eval.judge.cache={tmp_path}/cache.sqlite",
                         "eval.charts=false", "eval.bootstrap=0"])
    assert code == 3 and all(r["auth"] == f"Bearer {PLANTED}" for r in server.requests)  # the key was used...
    audit_cli(["bundle", "--train-run", str(run_dir), "--infer-output", str(run_dir / "submission.jsonl"),
               "--out", str(tmp_path / "audit")])  # exit 1: no data card, irrelevant here
    assert (tmp_path / "audit.tar.gz").is_file() and "[REDACTED]" in every_output_text(tmp_path / "eval")
    captured = capsys.readouterr()
    for where, text in [("train and infer", every_output_text(run_dir)), ("eval", every_output_text(tmp_path / "eval")),
                        ("audit", every_output_text(tmp_path / "audit")),
                        ("audit tarball", every_output_text(tmp_path / "audit.tar.gz")), ("stdout", captured.out),
                        ("stderr", captured.err)]:
        assert PLANTED not in text, where  # ...and written nowhere


# ---------------------------------------------------------------- 3. one writer per output; orphans exit


def infer_recipe(tiny_checkpoint, meta, output, *overrides):
    from core.recipe import load_recipe

    return load_recipe(None, [f"model.path={tiny_checkpoint}", "model.dtype=float32", f"infer.meta={meta}",
                              f"infer.output={output}", "infer.batch_size=4", "infer.max_new_tokens=4",
                              "infer.do_sample=false", *overrides])


@pytest.mark.slow  # a second Python process that imports torch
def test_a_second_writer_of_an_output_fails_at_once_naming_the_holder(tiny_checkpoint, synthetic_dir, tmp_path):
    import subprocess
    import sys

    from infer.run import OutputBusy, run

    out = tmp_path / "submission.jsonl"
    code = ("import sys, time; from pathlib import Path; from infer.run import output_lock\n"
            "with output_lock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputBusy, match=rf"{out}: another `infer run` is writing it \(pid {holder.pid} on "):
            run(infer_recipe(tiny_checkpoint, synthetic_dir / "test.jsonl", out))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["submission.jsonl.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow  # a second Python process that imports torch
def test_an_orphaned_data_parallel_worker_exits_when_its_parent_dies(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    # parent: starts a "worker" that watches it exactly as `infer run` workers do, prints its pid, waits
    worker = ("import time; from infer.run import exit_with_parent; exit_with_parent(poll_s=0.1); time.sleep(120)")
    parent = ("import os, subprocess, sys, time\n"
              f"env = {{**os.environ, 'INFER_PARENT_PID': str(os.getpid())}}\n"
              f"w = subprocess.Popen([sys.executable, '-c', {worker!r}], env=env)\n"
              "print(w.pid, flush=True); time.sleep(120)")
    process = subprocess.Popen([sys.executable, "-c", parent], cwd=REPO, stdout=subprocess.PIPE, text=True)
    pid = int(process.stdout.readline())
    time.sleep(1.0)
    assert alive(pid)  # watching, not yet gone: it ran past the import
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(pid)


def alive(pid: int) -> bool:
    """Running (a zombie no reaper collects counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


# ---------------------------------------------------------------- 4. resuming with other settings


def test_resuming_inference_with_other_settings_is_an_error_listing_them(tiny_checkpoint, synthetic_dir, tmp_path):
    from infer.run import run

    out = tmp_path / "submission.jsonl"
    run(infer_recipe(tiny_checkpoint, synthetic_dir / "test.jsonl", out, "infer.limit=2"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    other = infer_recipe(tiny_checkpoint, synthetic_dir / "test.jsonl", out, "infer.adapter=runs/other/adapter",
                         "infer.seed=7", "infer.limit=4")
    with pytest.raises(DataError, match=r"holds answers written with other settings.*Differing: infer.adapter: None -> "
                                        r"'runs/other/adapter'; infer.seed: 0 -> 7\. Restore them"):
        run(other)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing rewritten
    # what does not decide the answers may change: a larger limit and batch size resume the run
    summary = run(infer_recipe(tiny_checkpoint, synthetic_dir / "test.jsonl", out, "infer.limit=4", "infer.batch_size=2"))
    assert summary["complete"] and summary["this_invocation"]["answered"] == 2


def test_rerunning_training_with_other_settings_is_an_error_listing_them(recipe_file, tmp_path):
    from train.runtime import TrainingError

    assert run_sft(recipe_file, "train.max_steps=2") == 0
    run = tmp_path / "run"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(TrainingError, match=r"other settings.*Differing: train.seed: 0 -> 3; train.lr: 0.01 -> 0.001\."):
        run_sft(recipe_file, "train.max_steps=2", "train.lr=1e-3", "train.seed=3")
    with pytest.raises(TrainingError, match=r"Differing: lora.r: 4 -> 8\."):
        run_sft(recipe_file, "train.max_steps=2", "lora.r=8")
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # recipe.yaml and all untouched


# ---------------------------------------------------------------- 11. small ones


def test_seen_ids_hold_each_step_once_after_a_resume(recipe_file, tmp_path):
    import shutil

    run = tmp_path / "run"
    assert run_sft(recipe_file, "train.save_every=2", "train.stop_after=3") == 0
    shutil.rmtree(run / "checkpoints" / "step-3")  # killed after step 3, before its checkpoint
    assert run_sft(recipe_file, "train.save_every=2") == 0
    seen = [json.loads(line)["step"] for line in (run / "seen" / "rank0.jsonl").read_text().splitlines()]
    assert seen == [1, 2, 3, 4, 5, 6]


# ---------------------------------------------------------------- 9, 10. bad clips and long prompts do not stop a run


@pytest.fixture
def troubled_meta(tmp_path, synthetic_dir):
    """Six test items: #1 an unreadable clip, #2 a clip of NaNs, #3 a question past the tiny context
    (tokenized to find out), #4 a 5 MB question (refused from its length alone)."""
    records = [json.loads(line) for line in (synthetic_dir / "test.jsonl").read_text().splitlines()][:6]
    for r in records:
        r["audio_path"] = str(synthetic_dir / r["audio_path"])
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really a wave file")
    sf.write(str(tmp_path / "nan.wav"), np.full(16000, np.nan, dtype=np.float32), 16000, subtype="FLOAT")
    records[1]["audio_path"] = str(tmp_path / "garbage.wav")
    records[2]["audio_path"] = str(tmp_path / "nan.wav")
    records[3]["question"] = "how many beeps " * 2000
    records[4]["question"] = "x" * 5_000_000
    path = tmp_path / "meta.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path, [r["id"] for r in records]


def test_bad_clips_and_long_prompts_are_recorded_as_failed_and_the_rest_answered(tiny_checkpoint, troubled_meta, tmp_path, capsys):
    from infer.run import run

    meta, ids = troubled_meta
    out = tmp_path / "out" / "submission.jsonl"
    summary = run(infer_recipe(tiny_checkpoint, meta, out))
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [ids[0], ids[5]]
    failed = {f["id"]: f["error"] for f in json.loads(out.with_name("submission.run.json").read_text())["failed"]}
    assert list(failed) == ids[1:5] and summary["totals"]["failed"] == 4 and not summary["complete"]
    assert f"{meta}:2 (id={ids[1]}): audio_path: " in failed[ids[1]] and "cannot read audio header" in failed[ids[1]]
    assert f"{meta}:3 (id={ids[2]}): audio_path: " in failed[ids[2]] and "non-finite" in failed[ids[2]]
    assert re.search(r"prompt: [\d,]+ tokens \(audio included\) exceed the model's context of 4,096 tokens", failed[ids[3]])
    assert re.search(r"prompt: 5,000,\d+ characters cannot fit the model's context of 4,096 tokens", failed[ids[4]])
    assert f"with an unreadable clip: {ids[1]}" in capsys.readouterr().out


def test_fail_fast_stops_at_the_first_bad_clip(tiny_checkpoint, troubled_meta, tmp_path):
    from infer.run import run

    meta, ids = troubled_meta
    with pytest.raises(DataError, match=rf"{meta}:2 \(id={ids[1]}\): audio_path: .*cannot read audio header"):
        run(infer_recipe(tiny_checkpoint, meta, tmp_path / "out" / "submission.jsonl", "infer.fail_fast=true"))


# ---------------------------------------------------------------- 13. the judge stores every finished rating before raising


def test_a_fatal_judge_error_keeps_the_ratings_that_finished_with_it(tmp_path, monkeypatch):
    import concurrent.futures

    from eval import judge
    from eval.cache import JudgeCache
    from tests.test_eval_http import GOOD, RUBRIC

    class Backend:
        identity, max_workers = "fake", 4

        def complete(self, system, user):
            if user == "fatal":
                raise judge.FatalJudgeError("HTTP 401")
            return GOOD

    def together(futures, return_when):
        """Every rating completes in the same wait, the fatal one first (the order that lost ratings)."""
        done, _ = concurrent.futures.wait(futures, return_when=concurrent.futures.ALL_COMPLETED)
        return sorted(done, key=lambda f: f.exception() is None), set()

    monkeypatch.setattr(judge, "wait", together)
    jobs = [judge.JudgeJob("bad", "fatal", RUBRIC)] + [judge.JudgeJob(f"ok{i}", f"user {i}", RUBRIC) for i in range(3)]
    cache = JudgeCache(tmp_path / "cache.sqlite")
    with pytest.raises(judge.FatalJudgeError):
        judge.run_judge(jobs, Backend(), cache, 1, {}, 3, judge.RateLimiter(None), judge.Backoff(0, 0), progress=False)
    resumed = judge.run_judge(jobs[1:], Backend(), cache, 1, {}, 3, judge.RateLimiter(None), judge.Backoff(0, 0), progress=False)
    assert resumed.stats.cached == 3 and resumed.stats.calls_made == 0


# ---------------------------------------------------------------- 5. a dead judge is reported at once


def test_a_refused_connection_or_unknown_host_is_fatal_at_once(monkeypatch):
    import socket
    import time
    import urllib.error

    from eval import judge
    from tests.test_eval_http import RUBRIC

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dead = judge.OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", None, 0.0, 42, 5.0)
    began = time.monotonic()
    with pytest.raises(judge.FatalJudgeError, match=rf"127.0.0.1:{port}/v1/chat/completions: connection refused; is the judge"):
        judge.ask(dead, "u", RUBRIC, judge.RaterOutcome("i", 0, "k"), 20, judge.RateLimiter(None), judge.Backoff(1.0, 60.0))
    assert time.monotonic() - began < 5

    def unknown_host(*args, **kwargs):
        raise urllib.error.URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(judge.urllib.request.OpenerDirector, "open", unknown_host)
    nowhere = judge.OpenAIJudge("http://judge.invalid/v1", "m", None, 0.0, 42, 5.0)
    with pytest.raises(judge.FatalJudgeError, match=r"unknown host .*Name or service not known"):
        nowhere.complete("s", "u")
    nowhere.reached = True  # once the server has answered, a refusal is a restart to wait out
    with pytest.raises(judge.TransientError):
        nowhere.complete("s", "u")


def test_every_judge_retry_is_logged(caplog):
    from eval import judge
    from tests.test_eval_http import RUBRIC, ChatServer

    with ChatServer() as server:
        server.script = [(500, b"busy", 0.0), (429, b"slow down", 0.0)]
        backend = judge.OpenAIJudge(server.url, "m", None, 0.0, 42, 5.0)
        with caplog.at_level("WARNING", logger="eval.judge"):
            outcome = judge.ask(backend, "u", RUBRIC, judge.RaterOutcome("item-7", 2, "k"), 5, judge.RateLimiter(None),
                                judge.Backoff(0.01, 0.02))
    assert outcome.rating is not None
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(line.startswith("judge: item-7 rater 2, attempt ") for line in lines)
    assert "attempt 1 of 5: HTTP 500: busy; retrying in" in lines[0] and "attempt 2 of 5: HTTP 429" in lines[1]


# ---------------------------------------------------------------- 14. --help everywhere; the whole recipe on one screen


def _entry(module: str, function: str = "main"):
    import importlib

    return getattr(importlib.import_module(module), function)


HELP_COMMANDS = [
    ("train.sft", ["--help"]), ("train.sft", ["recipes/tiny.yaml", "train.lr=1e-3", "-h"]), ("train.merge", ["--help"]),
    ("infer.cli", ["--help"]), ("infer.cli", ["run", "--help"]), ("infer.cli", ["run", "recipes/tiny.yaml", "--help"]),
    ("infer.cli", ["validate", "--help"]), ("eval.__main__", ["--help"]), ("eval.__main__", ["score", "--help"]),
    ("eval.__main__", ["compare", "--help"]), ("eval.__main__", ["convert", "--help"]),
    ("data_prep.__main__", ["--help"]),
    *[("data_prep.__main__", [c, "--help"]) for c in ("collect", "qa", "cot", "verify", "card", "guard")],
    ("audit.__main__", ["--help"]), *[("audit.__main__", [c, "--help"]) for c in ("bundle", "verify", "compliance")],
    ("core.recipe", ["--help"]), ("core.recipe", ["show", "--help"]), ("core.feature_cache", ["--help"]),
    ("encoder.audio_encoder", ["--help"]), ("encoder.probe", ["--help"]),
]


@pytest.mark.parametrize("module, argv", HELP_COMMANDS, ids=[f"{m} {' '.join(a)}" for m, a in HELP_COMMANDS])
def test_every_command_answers_help_with_its_usage(module, argv, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: a run would leave files here
    try:
        code = _entry(module)(argv)
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr().out
    assert code in (0, None), out
    assert "usage" in out.lower() or out.startswith("Command line") or "python -m data_prep" in out, out
    assert list(tmp_path.iterdir()) == []


def test_recipe_show_lists_every_key_with_value_default_and_description(capsys):
    from core.recipe import Recipe, describe, dotted_keys
    from core.recipe import main as recipe_main

    rows = describe(Recipe())
    assert [key for key, *_ in rows] == dotted_keys(Recipe().model_dump(mode="json"))  # every key, in order
    undocumented = [key for key, _, _, note in rows if not note]
    assert undocumented == [], "add a comment to these fields in core/recipe.py"
    assert recipe_main(["show", "recipes/tiny.yaml", "train.lr=2e-3", "eval.judge.ratings=3"]) == 0
    lines = {line.split(" = ")[0]: line for line in capsys.readouterr().out.splitlines()}
    assert len(lines) == len(rows)
    assert re.fullmatch(r'train\.lr = 0\.002 +# peak learning rate \(AdamW\) \[default: 1e-05\]', lines["train.lr"])
    assert re.fullmatch(r'eval\.judge\.ratings = 3 +# ratings per item; the middle 3 are averaged \[default: 5\]',
                        lines["eval.judge.ratings"])
    assert "[default" not in lines["train.max_grad_norm"]  # unchanged keys show no default


# ---------------------------------------------------------------- 8. input errors: one message, no traceback


def test_non_utf8_metadata_names_file_and_line(tmp_path, synthetic_dir):
    from eval.submission import SubmissionError, load_meta

    lines = (synthetic_dir / "test.jsonl").read_bytes().splitlines(keepends=True)
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(lines[0] + lines[1].replace(b'"question": "', b'"question": "caf\xe9 ', 1))
    with pytest.raises(DataError, match=rf"{bad}:2: not UTF-8 \(byte 0xe9 at column \d+\)"):
        load_items(bad, check_audio=False)
    with pytest.raises(SubmissionError, match=rf"{bad}:2: not UTF-8 \(byte 0xe9 at column \d+\)"):
        load_meta(bad)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", r"train\.lrr: Extra inputs are not permitted"),
    ("data.train=[{path: MISSING.jsonl}]", r"MISSING\.jsonl: file not found"),
    ("model.path=Qwen/Not-Downloaded", r"Qwen/Not-Downloaded: no local checkpoint folder there; download it first "
                                       r"\(huggingface-cli download Qwen/Not-Downloaded --local-dir checkpoints/Not-Downloaded\)"),
])
def test_training_prints_input_errors_as_one_message(recipe_file, override, message, capsys):
    from accelerate.state import AcceleratorState

    from train.runtime import cli
    from train.sft import main

    AcceleratorState._reset_state(True)
    assert cli(main, [str(recipe_file), override]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err) and "Traceback" not in err


# ---------------------------------------------------------------- 11. one validation of metadata for scoring and inference


@pytest.mark.parametrize("choices, answer, problem", [
    (["only"], "only", r"choices: expected a list of at least 2 strings"),
    (["a", "a", "b"], "a", r"choices: duplicate choice"),
    (["a", "b"], "c", r"answer: 'c' is not one of its choices"),
])
def test_scoring_and_inference_reject_the_same_metadata(tmp_path, synthetic_dir, choices, answer, problem):
    from eval.submission import SubmissionError, load_meta

    record = json.loads((synthetic_dir / "test.jsonl").read_text().splitlines()[0])
    record.update(choices=choices, answer=answer)
    path = tmp_path / "meta.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=rf"{path}:1 \(id={record['id']}\): {problem}"):
        load_items(path, check_audio=False)
    with pytest.raises(SubmissionError, match=rf"{path}:1 \(id={record['id']}\): {problem}"):
        load_meta(path)


# ---------------------------------------------------------------- 6. local paths first; the hub only when asked


def test_hub_ids_load_only_with_the_opt_in(tiny_checkpoint, synthetic_dir, tmp_path, monkeypatch):
    from core import qwen_omni as qo
    from infer.engine import load_engine

    assert qo.checkpoint_source(tiny_checkpoint) == str(tiny_checkpoint)  # a local folder, with or without the opt-in
    assert qo.checkpoint_source("Qwen/Qwen3-Omni-30B-A3B-Thinking", allow_hub=True) == "Qwen/Qwen3-Omni-30B-A3B-Thinking"
    with pytest.raises(qo.CheckpointNotFound, match=r"^/no/such/folder: no local checkpoint folder there; check the path"):
        qo.checkpoint_source("/no/such/folder", allow_hub=True)  # not a hub id either
    recipe = infer_recipe("Qwen/Qwen3-Omni-30B-A3B-Thinking", synthetic_dir / "test.jsonl", tmp_path / "s.jsonl")
    for backend in ("hf", "vllm"):
        with pytest.raises(qo.CheckpointNotFound, match=r"set model.allow_hub=true"):
            load_engine(recipe.model_copy(update={"infer": recipe.infer.model_copy(update={"backend": backend})}))
    asked = []

    class Thinker:
        @staticmethod
        def from_pretrained(source, **kwargs):
            asked.append(source)
            return object(), {"missing_keys": set(), "unexpected_keys": set()}

    monkeypatch.setattr(qo.checkpoint, "thinker_class", lambda: Thinker)  # where load_thinker looks it up
    qo.load_thinker("Qwen/Qwen3-Omni-30B-A3B-Thinking", allow_hub=True)
    assert asked == ["Qwen/Qwen3-Omni-30B-A3B-Thinking"]


# ---------------------------------------------------------------- 12. progress in logs


def test_progress_off_a_terminal_is_a_line_per_interval_with_rate_and_eta():
    import io

    from core.progress import LogProgress

    now = [0.0]
    out = io.StringIO()
    bar = LogProgress(100, "infer", unit="item", stream=out, interval=30, clock=lambda: now[0])
    for _ in range(10):  # 10 items every 10 s
        now[0] += 10
        bar.set_postfix(tok_s="12.5")
        bar.update(10)
    bar.close()
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines() == [
        "infer: 30/100 (30%), 1 item/s, elapsed 0:00:30, ETA 0:01:10, tok_s=12.5",
        "infer: 60/100 (60%), 1 item/s, elapsed 0:01:00, ETA 0:00:40, tok_s=12.5",
        "infer: 90/100 (90%), 1 item/s, elapsed 0:01:30, ETA 0:00:10, tok_s=12.5",
        "infer: 100/100 (100%), 1 item/s, elapsed 0:01:40, ETA 0:00:00, tok_s=12.5",
    ]
    out = io.StringIO()  # bytes, as the audit's checksums count them
    bar = LogProgress(3 << 30, "sha256", unit="B", stream=out, interval=30, clock=lambda: now[0], unit_scale=True)
    now[0] += 40
    bar.update(1 << 30)
    assert out.getvalue() == "sha256: 1.07G/3.22G (33%), 26.8MB/s, elapsed 0:00:40, ETA 0:01:20\n"


def test_a_redirected_training_log_has_lines_not_carriage_returns(recipe_file, capsys, monkeypatch):
    from core import progress

    monkeypatch.setattr(progress, "PROGRESS_INTERVAL_S", 0.0)  # a line per step
    assert run_sft(recipe_file, "train.max_steps=3") == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    steps = [line for line in err.splitlines() if line.startswith("sft: ")]
    assert [line.split(",")[0] for line in steps] == ["sft: 1/3 (33%)", "sft: 2/3 (67%)", "sft: 3/3 (100%)"]
    assert all(" step/s, elapsed " in line and "loss=" in line for line in steps)
