"""The rubric judge: backends behind one interface, the official ask-again loop, and the runner.

A backend turns (system, user) into one reply string. Two exist:
- `OpenAIJudge`: any OpenAI-compatible chat-completions endpoint (the official GPT-4o, or an open
  judge behind vLLM), stdlib HTTP only, one request per call;
- `LocalJudge`: a transformers chat model on a local checkpoint (torch is imported only here).

`ask` is the official per-rating loop: up to `max_attempts` requests until a reply parses;
transient failures (429, 5xx, timeouts, lost connections) back off exponentially inside the same
budget. `run_judge` fans (item, rater) jobs out over a bounded thread pool under a shared rate
limit, serves what it can from the SQLite cache, and stores every parsed reply the moment it arrives.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import logging
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, Sequence

from core.redact import redact
from eval.cache import JudgeCache, cache_key
from eval.protocol import JUDGE_SYSTEM_PROMPT, ReplyError, parse_judge_reply

log = logging.getLogger(__name__)


class TransientError(Exception):
    """Worth retrying after a pause: rate limit, server error, timeout, dropped connection."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class RequestError(Exception):
    """This request cannot succeed (e.g. HTTP 400); its rating fails, the run goes on."""


class FatalJudgeError(RuntimeError):
    """No request can succeed (bad key, unknown model or URL): the run stops, finished work is kept."""


class JudgeRedirectError(FatalJudgeError):
    """The judge answered with a redirect: never followed, so the API key goes to the configured address only."""


class MalformedResponse(TransientError):
    """An HTTP 200 that is not a chat completion with a text reply; asked again like any transient failure."""


class ReplyTooLarge(RequestError):
    """A reply body over `MAX_REPLY_BYTES`: the read stops there and the rating fails."""


MAX_REPLY_BYTES = 8 << 20  # a chat completion is kilobytes; a body this large is not one


class JudgeBackend(Protocol):
    identity: str  # the judge model in the cache key
    max_workers: int

    def complete(self, system: str, user: str) -> str | None: ...


# ---------------------------------------------------------------- OpenAI-compatible HTTP


class OpenAIJudge:
    def __init__(self, base_url: str, model: str, api_key: str | None, temperature: float, seed: int | None,
                 timeout_s: float, max_tokens: int | None = None, concurrency: int = 8):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key, self.timeout_s = model, api_key, timeout_s
        self.sampling = {"temperature": temperature, "seed": seed}
        if max_tokens is not None:
            self.sampling["max_tokens"] = max_tokens
        self.identity = f"openai:{model}"
        self.max_workers = concurrency
        self.reached = False  # whether the server ever answered: until then, a refused connection is fatal

    def complete(self, system: str, user: str) -> str | None:
        body = {"model": self.model, "messages": [{"role": "system", "content": system},
                                                  {"role": "user", "content": user}], **self.sampling}
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=json.dumps(body).encode("utf-8"), headers=headers)
        # The timeout bounds the whole request: every socket read gets only what is left of it, so a server
        # trickling bytes cannot hold a rating (or the run) past it.
        deadline = time.monotonic() + self.timeout_s
        opener = urllib.request.build_opener(_NoRedirect, _DeadlineHTTP(deadline, self.timeout_s),
                                             _DeadlineHTTPS(deadline, self.timeout_s))
        try:
            with opener.open(request, timeout=self.timeout_s) as response:
                raw = _read_bounded(response, self.url)
            self.reached = True
        except urllib.error.HTTPError as err:
            self.reached = True
            if 300 <= err.code < 400:
                raise JudgeRedirectError(
                    f"{self.url}: HTTP {err.code} redirect to {err.headers.get('Location')!r} refused (the API key is "
                    f"sent to eval.judge.base_url only); set eval.judge.base_url to the address the server names") from None
            detail = redact(err.read(300).decode("utf-8", "replace"))  # servers echo the key they refused
            if err.code == 429 or err.code == 408 or err.code >= 500:
                raise TransientError(f"HTTP {err.code}: {detail}", _retry_after(err.headers.get("Retry-After"))) from None
            if err.code in (401, 403, 404):
                raise FatalJudgeError(f"{self.url}: HTTP {err.code} ({detail}); check eval.judge.base_url, "
                                      f"eval.judge.model and the API key") from None
            raise RequestError(f"HTTP {err.code}: {detail}") from None
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError) as err:
            reason = getattr(err, "reason", err)
            if not self.reached and isinstance(reason, (ConnectionRefusedError, socket.gaierror)):
                # nothing listens there (or no such host): waiting out the retries would only hide it
                what = "connection refused" if isinstance(reason, ConnectionRefusedError) else f"unknown host ({reason})"
                raise FatalJudgeError(f"{self.url}: {what}; is the judge server running? check eval.judge.base_url") from None
            raise TransientError(f"{type(err).__name__}: {err}") from None
        try:
            content = json.loads(raw)["choices"][0]["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError):
            raise MalformedResponse(f"malformed API response: {raw[:120]!r}") from None
        if content is not None and not isinstance(content, str):  # None: an empty reply, a parse failure
            raise MalformedResponse(f"malformed API response: message content is a {type(content).__name__}, "
                                    f"not a string: {raw[:120]!r}")
        return content


def _read_bounded(response, url: str) -> bytes:
    """The body, or `ReplyTooLarge` as soon as it passes `MAX_REPLY_BYTES` (nothing beyond is read)."""
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > MAX_REPLY_BYTES:
        raise ReplyTooLarge(f"{url}: reply of {int(declared)} bytes exceeds {MAX_REPLY_BYTES} bytes")
    chunks, size = [], 0
    while chunk := response.read(1 << 16):
        size += len(chunk)
        if size > MAX_REPLY_BYTES:
            raise ReplyTooLarge(f"{url}: reply exceeds {MAX_REPLY_BYTES} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Hands every redirect back as an `HTTPError` (3xx) instead of following it with the key."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class _DeadlineReader(io.RawIOBase):
    """A response's socket reads, each allowed only what is left of the request's total time."""

    def __init__(self, raw, sock, deadline: float, budget_s: float):
        super().__init__()
        self.raw, self.sock, self.deadline, self.budget_s = raw, sock, deadline, budget_s

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        left = self.deadline - time.monotonic()
        if left > 0:
            self.sock.settimeout(left)
            try:
                return self.raw.readinto(buffer)
            except TimeoutError:
                pass
        raise TimeoutError(f"timed out: no complete reply within {self.budget_s:g} s")

    def close(self) -> None:
        if not self.closed:
            self.raw.close()
        super().close()


class _DeadlineResponse(http.client.HTTPResponse):
    def __init__(self, sock, *args, deadline: float, budget_s: float, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.fp = io.BufferedReader(_DeadlineReader(self.fp.detach(), sock, deadline, budget_s))


class _Deadline:
    """urllib handler mixin: the connections it opens read their response under one total deadline."""

    def __init__(self, deadline: float, budget_s: float):
        super().__init__()
        self.deadline, self.budget_s = deadline, budget_s

    def do_open(self, http_class, req, **kwargs):
        def connection(*args, **kw):
            conn = http_class(*args, **kw)
            conn.response_class = functools.partial(_DeadlineResponse, deadline=self.deadline, budget_s=self.budget_s)
            return conn

        return super().do_open(connection, req, **kwargs)


class _DeadlineHTTP(_Deadline, urllib.request.HTTPHandler):
    pass


class _DeadlineHTTPS(_Deadline, urllib.request.HTTPSHandler):
    pass


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


# ---------------------------------------------------------------- local transformers model


class LocalJudge:
    """Text-only chat with a local checkpoint; the Qwen3-Omni thinker loads through `core.qwen_omni`."""

    max_workers = 1  # one model, one generation at a time

    def __init__(self, path: str, temperature: float, seed: int | None, max_new_tokens: int,
                 dtype: str = "auto", device: str | None = None):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from core import qwen_omni

        self.torch, self.think_close = torch, qwen_omni.THINK_CLOSE
        self.tokenizer = qwen_omni.load_tokenizer(path)  # the template may sit in chat_template.json
        if "qwen3_omni" in AutoConfig.from_pretrained(path).model_type:
            self.model = qwen_omni.load_thinker(path, dtype=dtype, device=device)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(device or "cpu")
        self.model.eval()
        self.context = qwen_omni.context_length(self.model.config)
        self.temperature, self.seed, self.max_new_tokens = temperature, seed, max_new_tokens
        self.identity = f"local:{Path(path).resolve()}"

    def complete(self, system: str, user: str) -> str | None:
        torch = self.torch
        messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.tokenizer(text, return_tensors="pt").to(self.model.device)
        prompt_len = inputs["input_ids"].shape[1]
        if self.context and prompt_len + self.max_new_tokens > self.context:
            raise RequestError(f"prompt of {prompt_len} tokens + {self.max_new_tokens} new exceeds the "
                               f"model's {self.context} positions")
        sampling = {"do_sample": False}
        if self.temperature > 0:
            sampling = {"do_sample": True, "temperature": self.temperature}
        if self.seed is not None:
            torch.manual_seed(self.seed)
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, **sampling)
        new = out[0, prompt_len:].tolist()
        # A thinking judge reasons first: keep only what follows its last </think>.
        close_id = self.tokenizer.convert_tokens_to_ids(self.think_close)
        if close_id in new:
            new = new[len(new) - new[::-1].index(close_id):]
        return self.tokenizer.decode(new, skip_special_tokens=True)


# ---------------------------------------------------------------- the ask-again loop


class RateLimiter:
    """At most `per_minute` request starts per minute across all threads (evenly spaced)."""

    def __init__(self, per_minute: float | None):
        self.interval = 60.0 / per_minute if per_minute else 0.0
        self.lock = threading.Lock()
        self.next_slot = time.monotonic()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            slot = max(self.next_slot, time.monotonic())
            self.next_slot = slot + self.interval
        time.sleep(max(0.0, slot - time.monotonic()))


@dataclass
class Backoff:
    base_s: float = 1.0
    max_s: float = 60.0

    def delay(self, streak: int, retry_after: float | None) -> float:
        wanted = min(self.max_s, self.base_s * 2**streak) * random.uniform(0.5, 1.0)  # jitter de-synchronises threads
        return max(wanted, min(retry_after or 0.0, self.max_s))


@dataclass
class RaterOutcome:
    item_id: str
    rater: int
    key: str
    reply: str | None = None  # the reply that parsed; None when every attempt failed
    rating: float | None = None
    attempts: int = 0
    parse_failures: list[str] = field(default_factory=list)
    transient_errors: list[str] = field(default_factory=list)
    error: str | None = None


def ask(backend: JudgeBackend, user: str, rubric: Sequence[dict], outcome: RaterOutcome, max_attempts: int,
        limiter: RateLimiter, backoff: Backoff) -> RaterOutcome:
    """Ask until a reply parses, at most `max_attempts` requests (the official budget: 20)."""
    streak = 0
    while outcome.attempts < max_attempts:
        outcome.attempts += 1
        limiter.wait()
        try:
            reply = backend.complete(JUDGE_SYSTEM_PROMPT, user)
        except TransientError as err:
            outcome.transient_errors.append(str(err))
            if outcome.attempts < max_attempts:
                pause = backoff.delay(streak, err.retry_after)
                log.warning("judge: %s rater %d, attempt %d of %d: %s; retrying in %.1f s", outcome.item_id,
                            outcome.rater, outcome.attempts, max_attempts, err, pause)
                time.sleep(pause)
            else:
                log.warning("judge: %s rater %d, attempt %d of %d: %s; no attempt left", outcome.item_id,
                            outcome.rater, outcome.attempts, max_attempts, err)
            streak += 1
            continue
        except RequestError as err:
            outcome.error = str(err)
            return outcome
        streak = 0
        try:
            outcome.rating = parse_judge_reply(reply, rubric)
            outcome.reply = reply
            return outcome
        except ReplyError as err:
            outcome.parse_failures.append(f"{err} | reply: {str(reply)[:200]!r}")
    last = (outcome.parse_failures or outcome.transient_errors or ["?"])[-1]
    outcome.error = f"no parsable reply after {outcome.attempts} attempts (last: {last})"
    return outcome


# ---------------------------------------------------------------- the runner


@dataclass
class JudgeJob:
    item_id: str
    user: str
    rubric: list[dict]


@dataclass
class JudgeStats:
    requested: int = 0  # ratings needed
    cached: int = 0  # ratings served from the cache
    calls_made: int = 0  # requests sent
    retried: int = 0  # requests beyond the first of each rating
    parse_failures: int = 0
    transient_errors: int = 0
    failed_ratings: int = 0
    parse_failure_examples: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class JudgeResult:
    ratings: dict[str, list[float]]  # item id -> its ratings, complete items only
    failures: dict[str, str]  # item id -> why it is NOT EVALUATED
    stats: JudgeStats


def run_judge(jobs: Sequence[JudgeJob], backend: JudgeBackend, cache: JudgeCache, ratings: int, settings: dict,
              max_attempts: int, limiter: RateLimiter, backoff: Backoff, progress: bool = True) -> JudgeResult:
    """Collect `ratings` ratings for every job, from the cache or the backend."""
    start = time.perf_counter()
    stats = JudgeStats(requested=len(jobs) * ratings)
    by_item: dict[str, list[float | None]] = {job.item_id: [None] * ratings for job in jobs}
    failures: dict[str, str] = {}
    keyed = [(job, r, cache_key(backend.identity, JUDGE_SYSTEM_PROMPT, job.user, r, settings))
             for job in jobs for r in range(ratings)]
    cached = cache.get_many([key for _, _, key in keyed])
    todo = []
    for job, r, key in keyed:
        if key in cached:
            try:
                by_item[job.item_id][r] = parse_judge_reply(cached[key], job.rubric)
                stats.cached += 1
                continue
            except ReplyError:
                pass  # stored under an older parser: ask again
        todo.append((job, r, key))

    if todo:
        bar = _progress(len(todo), progress)
        workers = max(1, min(backend.max_workers, len(todo)))
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="judge")
        pending: set[Future] = set()
        queue = iter(todo)

        def submit_next() -> bool:
            nxt = next(queue, None)
            if nxt is None:
                return False
            job, r, key = nxt
            outcome = RaterOutcome(job.item_id, r, key)
            pending.add(pool.submit(ask, backend, job.user, job.rubric, outcome, max_attempts, limiter, backoff))
            return True

        error: Exception | None = None  # the first FatalJudgeError (or bug): raised once finished work is stored
        try:
            # Keep only a window of jobs in flight, so an abort leaves little queued work behind.
            while len(pending) < 2 * workers and submit_next():
                pass
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    pending.discard(future)
                    if future.cancelled():
                        continue
                    try:
                        outcome: RaterOutcome = future.result()
                    except Exception as err:  # noqa: BLE001 - kept, raised after the others are stored
                        error = error or err
                        continue
                    _account(outcome, stats)
                    if outcome.reply is not None:
                        cache.put(outcome.key, backend.identity, outcome.item_id, outcome.rater, settings,
                                  outcome.reply, outcome.attempts)
                        by_item[outcome.item_id][outcome.rater] = outcome.rating
                    else:
                        failures.setdefault(outcome.item_id, f"rater {outcome.rater}: {outcome.error}")
                    bar.update(1)
                    if error is None:
                        submit_next()
                if error is not None:  # queued jobs never start; the running ones finish and are stored
                    for future in pending:
                        future.cancel()
            if error is not None:
                raise error
        finally:
            for future in pending:
                future.cancel()
            pool.shutdown(wait=True, cancel_futures=True)
            bar.close()
    stats.seconds = time.perf_counter() - start
    if stats.calls_made:
        log.info("judge: %d calls in %.1f s (%.2f calls/s), %d cached", stats.calls_made, stats.seconds,
                 stats.calls_made / max(stats.seconds, 1e-9), stats.cached)
    complete = {item: [x for x in rs if x is not None] for item, rs in by_item.items()
                if item not in failures and all(x is not None for x in rs)}
    return JudgeResult(ratings=complete, failures=failures, stats=stats)


def _account(outcome: RaterOutcome, stats: JudgeStats) -> None:
    stats.calls_made += outcome.attempts
    stats.retried += max(0, outcome.attempts - 1)
    stats.parse_failures += len(outcome.parse_failures)
    stats.transient_errors += len(outcome.transient_errors)
    if outcome.reply is None:
        stats.failed_ratings += 1
    for failure in outcome.parse_failures:
        if len(stats.parse_failure_examples) < 20:
            stats.parse_failure_examples.append(f"{outcome.item_id} rater {outcome.rater}: {failure}")


def _progress(total: int, enabled: bool):
    from core.progress import progress

    return progress(total, "judge", unit="rating", disable=not enabled)


def make_backend(cfg, env: dict | None = None) -> JudgeBackend:
    """The backend a `JudgeConfig` names (`backend: none` has no backend)."""
    env = os.environ if env is None else env
    if cfg.backend == "openai":
        key = env.get(cfg.api_key_env)
        if not key:
            log.warning("$%s is not set: calling %s without an API key", cfg.api_key_env, cfg.base_url)
        return OpenAIJudge(cfg.base_url, cfg.model, key, cfg.temperature, cfg.seed, cfg.timeout_s,
                           cfg.max_tokens, cfg.concurrency)
    if cfg.backend == "local":
        return LocalJudge(cfg.model, cfg.temperature, cfg.seed, cfg.max_tokens or 1024, cfg.dtype, cfg.device)
    raise ValueError(f"judge backend {cfg.backend!r} makes no calls")


def sampling_settings(cfg) -> dict:
    """What, besides the model and the prompt, decides the reply: part of every cache key."""
    return {"temperature": cfg.temperature, "seed": cfg.seed, "max_tokens": cfg.max_tokens}
