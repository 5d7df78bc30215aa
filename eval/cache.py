"""A persistent judge cache in SQLite: one row per (judge model, prompt, rater, sampling settings).

Only replies that parsed are stored, each as soon as it arrives: a re-run makes no call for them,
and an interrupted run resumes with exactly the ratings it still lacks.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path


def cache_key(model: str, system: str, user: str, rater: int, settings: dict) -> str:
    prompt_sha = hashlib.sha256(f"{system}\x00{user}".encode("utf-8")).hexdigest()
    blob = json.dumps({"model": model, "prompt": prompt_sha, "rater": rater, "settings": settings}, sort_keys=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class JudgeCache:
    """Reads and writes happen on the thread that opened it (the scorer's main thread)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(self.path))
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, model TEXT, item_id TEXT, rater INTEGER,"
            " settings TEXT, reply TEXT NOT NULL, attempts INTEGER, created REAL)"
        )
        self.db.commit()

    def get_many(self, keys: list[str]) -> dict[str, str]:
        found: dict[str, str] = {}
        for start in range(0, len(keys), 500):  # stay under SQLite's bound-parameter limit
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            found.update(self.db.execute(f"SELECT key, reply FROM replies WHERE key IN ({marks})", chunk))
        return found

    def put(self, key: str, model: str, item_id: str, rater: int, settings: dict, reply: str, attempts: int) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO replies VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (key, model, item_id, rater, json.dumps(settings, sort_keys=True), reply, attempts, time.time()),
        )
        self.db.commit()

    def __len__(self) -> int:
        return self.db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self.db.close()
