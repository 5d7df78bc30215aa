"""A persistent judge cache in SQLite: one row per (judge model, prompt, rater, sampling settings).

Only replies that parsed are stored, each as soon as it arrives: a re-run makes no call for them,
and an interrupted run resumes with exactly the ratings it still lacks.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sqlite3
import time
from pathlib import Path


def cache_key(model: str, system: str, user: str, rater: int, settings: dict) -> str:
    prompt_sha = hashlib.sha256(f"{system}\x00{user}".encode("utf-8")).hexdigest()
    blob = json.dumps({"model": model, "prompt": prompt_sha, "rater": rater, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCacheError(RuntimeError):
    """The cache file is damaged: named, with how to recover; never replaced behind the user's back, since
    every reply in it was a paid-for request."""


class JudgeCache:
    """Reads and writes happen on the thread that opened it (the scorer's main thread).

    Opening runs SQLite's quick_check (a pass over the file, milliseconds for a cache of thousands of
    replies): a damaged file is a `JudgeCacheError` at once, not a failure halfway through scoring."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._named():
            self.db = sqlite3.connect(str(self.path))
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, item_id TEXT, rater INTEGER,"
                " settings TEXT, reply TEXT NOT NULL, attempts INTEGER, created REAL)"
            )
            self.db.commit()
            problems = [row[0] for row in self.db.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError("; ".join(problems[:3]))

    @contextlib.contextmanager
    def _named(self):
        try:
            yield
        except sqlite3.DatabaseError as err:
            raise JudgeCacheError(
                f"{self.path}: damaged judge cache ({err}). Recover its replies with `sqlite3 {self.path} .recover "
                f"| sqlite3 {self.path}.recovered` and set eval.judge.cache to that file, or move it aside "
                f"(`mv {self.path} {self.path}.damaged`) to start an empty cache: its ratings are then asked again"
            ) from None

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        with self._named():
            for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
                chunk = keys[start : start + 500]
                marks = ",".join("?" * len(chunk))
                found.update(self.db.execute(f"SELECT key, reply FROM replies WHERE key IN ({marks})", chunk))
        return found

    def put(self, key: str, model: str, item_id: str, rater: int, settings: dict, reply: str, attempts: int) -> None:
        with self._named():
            self.db.execute(
                "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (key, model, item_id, rater, json.dumps(settings, sort_keys=True), reply, attempts, time.time()),
            )
            self.db.commit()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self.db.close()
