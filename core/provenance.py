"""Where a run happened: the code (git), the packages (pip freeze) and the machine (Python, torch, CUDA, GPU/CPU)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from core.redact import is_secret_file, redact

REPO = Path(__file__).resolve().parents[1]
# Libraries whose version changes numerics or behaviour of training and inference.
KEY_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "deepspeed", "vllm", "numpy",
                "librosa", "soundfile", "safetensors")


def _run(command: list[str], cwd: Path | None = None) -> str | None:
    """stdout of a command, or None when it is absent or fails."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state(repo: Path | None = None) -> tuple[dict, str | None]:
    """({commit, branch, dirty, status, untracked}, a patch of the tracked changes when the tree is dirty).

    `git apply` of the patch on a checkout of the commit rebuilds the tracked code that ran. Untracked
    files are recorded by name, size and sha256 only, never their contents (they are where `.env`
    files and keys lie); tracked files that hold credentials by name (`.env`, `*.pem`, ...) are left
    out of the patch, and the patch is redacted (`core.redact`).
    """
    repo = REPO if repo is None else repo
    commit = _run(["git", "rev-parse", "HEAD"], repo)
    if commit is None:
        return {"commit": None, "note": f"{repo} is not a git checkout (or git is missing)"}, None
    status = _run(["git", "status", "--porcelain"], repo) or ""
    dirty = bool(status.strip())
    state = {
        "commit": commit.strip(),
        "branch": (_run(["git", "rev-parse", "--abbrev-ref", "HEAD"], repo) or "").strip(),
        "dirty": dirty,
        "status": status.splitlines(),
        "untracked": [],
        "secret_files_left_out": [],
    }
    if not dirty:
        return state, None
    for path in (_run(["git", "ls-files", "--others", "--exclude-standard"], repo) or "").splitlines():
        if is_secret_file(path):
            state["secret_files_left_out"].append(path)
        else:
            file = repo / path
            if file.is_symlink():  # git keeps a link as its target; one to a folder (a shared .venv) has no bytes to hash
                state["untracked"].append({"path": path, "symlink": os.readlink(file)})
            else:
                state["untracked"].append({"path": path, "bytes": file.stat().st_size, "sha256": sha256_file(file)})
    changed = (_run(["git", "diff", "HEAD", "--name-only"], repo) or "").splitlines()
    secret = [path for path in changed if is_secret_file(path)]
    state["secret_files_left_out"] += secret
    patch = _run(["git", "diff", "HEAD", "--binary", "--", ".", *[f":(exclude){path}" for path in secret]], repo) or ""
    return state, redact(patch)


def pip_freeze() -> str:
    """`pip freeze` of this interpreter; the installed distributions when pip is absent."""
    frozen = _run([sys.executable, "-m", "pip", "freeze", "--all"])
    if frozen is not None:
        return redact(frozen)  # a requirement URL may carry a token
    dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    return "# pip not available: installed distributions from importlib.metadata\n" + "\n".join(dists) + "\n"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_gb() -> float | None:
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    return None


def nvidia_smi() -> str | None:
    """The full `nvidia-smi` report, when the tool is present."""
    return _run(["nvidia-smi"]) if shutil.which("nvidia-smi") else None


def system() -> dict:
    import torch

    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"index": index, "name": props.name, "memory_gb": round(props.total_memory / 2**30, 1),
                         "capability": f"{props.major}.{props.minor}"})
    driver = None
    if shutil.which("nvidia-smi"):
        driver = (_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]) or "").strip().splitlines()
        driver = driver[0] if driver else None
    return {
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gb": memory_gb(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nvidia_driver": driver,
        "gpus": gpus,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "packages": {name: _version(name) for name in KEY_PACKAGES},
    }


def record_session(out_dir: str | Path) -> dict:
    """Append where this process runs to `out_dir/provenance.jsonl` and return the entry.

    One line per session (a resumed run adds one), written when the run starts, so the commit that
    trained an adapter is known even if the checkout moves on before an audit bundle is made. A dirty
    tree's changes go to `provenance/session-N.patch`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "provenance.jsonl"
    session = sum(1 for _ in log.open()) if log.is_file() else 0
    git, patch = git_state()
    entry = {"session": session, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": [redact(a) for a in sys.argv],
             "git": git, "system": system(), "patch": None}
    if patch is not None:
        entry["patch"] = f"provenance/session-{session}.patch"
        (out / "provenance").mkdir(exist_ok=True)
        (out / entry["patch"]).write_text(patch)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    return entry
