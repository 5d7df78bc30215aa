"""The OpenAI-compatible HTTP judge against a local test server (127.0.0.1, ephemeral port, no network)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from core.recipe import JudgeConfig
from eval.cache import JudgeCache
from eval.judge import Backoff, FatalJudgeError, JudgeJob, OpenAIJudge, RateLimiter, RaterOutcome, ask, make_backend, run_judge

RUBRIC = [{"name": f"c{i}", "scoring_point": "p", "choices": [0, 1]} for i in range(5)]
GOOD = json.dumps([{"name": f"c{i}", "score": int(i < 3), "justification": "j"} for i in range(5)])  # 3/5


def completion(content) -> bytes:
    return json.dumps({"id": "x", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}).encode()


class ChatServer:
    """Answers POST /v1/chat/completions from a script of (status, body, delay_s); then the default."""

    def __init__(self):
        self.script: list[tuple[int, bytes, float]] = []
        self.default = (200, completion(GOOD), 0.0)
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append({"path": self.path, "body": body,
                                            "auth": self.headers.get("Authorization")})
                    status, payload, delay = server.script.pop(0) if server.script else server.default
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    if status == 429:
                        self.send_header("Retry-After", "0")
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout test)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    with ChatServer() as s:
        yield s


FAST = Backoff(base_s=0.01, max_s=0.05)


def judge_for(server, timeout_s=2.0) -> OpenAIJudge:
    return OpenAIJudge(server.url, "judge-model", "sk-test", 0.0, 42, timeout_s)


def ask_once(judge, max_attempts=5) -> RaterOutcome:
    return ask(judge, "user prompt", RUBRIC, RaterOutcome("i1", 0, "k"), max_attempts, RateLimiter(None), FAST)


def test_success_sends_the_official_request(server):
    out = ask_once(judge_for(server))
    assert out.rating == pytest.approx(0.6) and out.attempts == 1 and out.error is None
    (req,) = server.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer sk-test"
    body = req["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0.0 and body["seed"] == 42
    assert "max_tokens" not in body  # not sent unless configured, like the official script
    assert [m["role"] for m in body["messages"]] == ["system", "user"]
    assert body["messages"][0]["content"].startswith("You are a impartial and meticulous AI evaluator.")
    assert body["messages"][1]["content"] == "user prompt"


def test_429_and_500_are_retried_with_backoff(server):
    server.script = [(429, b'{"error": "rate limited"}', 0), (500, b'{"error": "oops"}', 0),
                     (503, b"unavailable", 0)]
    start = time.perf_counter()
    out = ask_once(judge_for(server))
    assert out.rating == pytest.approx(0.6) and out.attempts == 4
    assert [e.split(":")[0] for e in out.transient_errors] == ["HTTP 429", "HTTP 500", "HTTP 503"]
    assert time.perf_counter() - start < 2.0


def test_timeout_is_retried(server):
    server.script = [(200, completion(GOOD), 1.0)]  # slower than the client's timeout
    out = ask_once(judge_for(server, timeout_s=0.2))
    assert out.rating == pytest.approx(0.6) and out.attempts == 2
    assert "timed out" in out.transient_errors[0].lower()


def test_garbage_replies_are_asked_again_then_fail(server):
    server.default = (200, completion("I cannot comply with JSON today."), 0.0)
    server.script = [(200, b"<html>not json</html>", 0.0), (200, completion(None), 0.0)]
    out = ask_once(judge_for(server), max_attempts=4)
    assert out.rating is None and out.reply is None and out.attempts == 4
    assert "malformed API response" in out.transient_errors[0]
    assert len(out.parse_failures) == 3 and "empty reply" in out.parse_failures[0]
    assert out.error.startswith("no parsable reply after 4 attempts")
    # ... and a later good reply within the budget is accepted.
    server.script = [(200, completion("no json"), 0.0), (200, completion(GOOD), 0.0)]
    out = ask_once(judge_for(server), max_attempts=4)
    assert out.rating == pytest.approx(0.6) and out.attempts == 2 and len(out.parse_failures) == 1


def test_auth_error_stops_the_run(server):
    server.default = (401, b'{"error": "invalid key"}', 0.0)
    with pytest.raises(FatalJudgeError, match="HTTP 401"):
        ask_once(judge_for(server))
    assert len(server.requests) == 1  # not retried


def test_bad_request_fails_only_that_rating(server):
    server.script = [(400, b'{"error": "context too long"}', 0.0)]
    out = ask_once(judge_for(server))
    assert out.rating is None and out.attempts == 1 and "HTTP 400" in out.error


def test_runner_over_http_with_concurrency_and_cache(server, tmp_path):
    cfg = JudgeConfig(backend="openai", base_url=server.url, model="judge-model", api_key_env="EVAL_TEST_KEY",
                      concurrency=4)
    judge = make_backend(cfg, env={"EVAL_TEST_KEY": "sk-env"})
    server.script = [(500, b"x", 0.0)]
    jobs = [JudgeJob(f"i{n}", f"prompt {n}", RUBRIC) for n in range(6)]
    cache = JudgeCache(tmp_path / "c.sqlite")
    result = run_judge(jobs, judge, cache, 5, {"t": 0}, 5, RateLimiter(None), FAST, progress=False)
    assert set(result.ratings) == {f"i{n}" for n in range(6)} and not result.failures
    assert result.stats.calls_made == 31 and result.stats.retried == 1 and result.stats.transient_errors == 1
    assert all(r["auth"] == "Bearer sk-env" for r in server.requests)
    again = run_judge(jobs, judge, cache, 5, {"t": 0}, 5, RateLimiter(None), FAST, progress=False)
    assert again.stats.calls_made == 0 and again.stats.cached == 30 and len(server.requests) == 31
    cache.close()


def test_rate_limiter_spaces_requests():
    limiter = RateLimiter(per_minute=1200)  # one every 50 ms
    start = time.perf_counter()
    for _ in range(5):
        limiter.wait()
    assert time.perf_counter() - start >= 0.19
