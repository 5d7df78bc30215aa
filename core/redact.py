"""Keeping credentials out of every file a run writes (provenance, audit bundles, reports, logs).

Files that hold credentials by convention (`.env`, `*.pem`, `.netrc`, SSH keys) are named, never
read; text that goes to disk passes through `redact`, which blanks what looks like a credential
(`*_API_KEY=...`, bearer tokens, `sk-...`/`hf_...` keys, private-key blocks, passwords in URLs)
and the value of every environment variable whose name says it is one. Stdlib only: scoring uses it.
"""

from __future__ import annotations

import fnmatch
import os
import re

REDACTED = "[REDACTED]"
SECRET_FILES = (".env", ".env.*", "*.env", "*.pem", "*.key", "*.p12", "*.pfx", ".netrc", "_netrc", ".pypirc",
                "id_rsa*", "id_ed25519*", "id_ecdsa*", "credentials", "credentials.json", ".git-credentials")
SECRET_NAME = re.compile(r"(API_?KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?)", re.IGNORECASE)
PATTERNS = (  # narrow on purpose: a code diff must still apply after redaction
    (re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----", re.DOTALL), REDACTED),
    # env style: OPENAI_API_KEY=value, export HF_TOKEN="value" (the name kept, the value blanked)
    (re.compile(r"""(\b[A-Z][A-Z0-9_]*(?:API_?KEY|TOKEN|SECRET|PASSWORD)[A-Z0-9_]*\s*=\s*["']?)[^\s"']{8,}"""), r"\1" + REDACTED),
    # JSON/YAML style: "api_key": "value"
    (re.compile(r"""(["']?\b\w*(?:api_?key|token|secret|password)["']?\s*:\s*["'])[^"'\s]{8,}""", re.IGNORECASE),
     r"\1" + REDACTED),
    (re.compile(r"(\bbearer\s+)[\w.~+/=-]{16,}", re.IGNORECASE), r"\1" + REDACTED),
    (re.compile(r"\b(?:sk|hf|ghp|gho|github_pat|xox[abp])[-_][\w-]{16,}"), REDACTED),
    (re.compile(r"(://)[^/\s:@]+:[^/\s@]+@"), r"\1" + REDACTED + "@"),  # https://user:password@host
)
MIN_SECRET_LENGTH = 8  # shorter environment values ("1", "true") would blank ordinary text


def is_secret_file(path: str) -> bool:
    """A file that holds credentials by convention (by its name only; it is never opened)."""
    name = os.path.basename(path.rstrip("/"))
    return any(fnmatch.fnmatch(name, pattern) for pattern in SECRET_FILES)


def secret_values(env: dict | None = None) -> list[str]:
    """Values of the environment variables whose names say they hold a credential, longest first."""
    env = os.environ if env is None else env
    values = {v for k, v in env.items() if SECRET_NAME.search(k) and len(v) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)


def redact(text: str, env: dict | None = None) -> str:
    """`text` with everything that looks like a credential replaced by [REDACTED]."""
    for value in secret_values(env):
        text = text.replace(value, REDACTED)
    for pattern, replacement in PATTERNS:
        text = pattern.sub(replacement, text)
    return text
