"""Where a run happened: the code (git), the packages (pip freeze) and the machine (Python, torch, CUDA, GPU/CPU)."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Libraries whose version changes numerics or behaviour of training and inference.
KEY_PACKAGES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "deepspeed", "vllm", "numpy",
                "librosa", "soundfile", "safetensors")
UNTRACKED_MAX_BYTES = 10 * 2**20  # larger untracked files are named in the git state, not put in the patch


def _run(command: list[str], cwd: Path | None = None) -> str | None:
    """stdout of a command, or None when it is absent or fails."""
    try:
        done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def _untracked_patch(repo: Path, path: str) -> str | None:
    """A patch creating one untracked file (`git diff --no-index` exits 1 when there is a difference)."""
    done = subprocess.run(["git", "diff", "--no-index", "--binary", "--", "/dev/null", path], cwd=repo,
                          capture_output=True, text=True, timeout=120)
    return done.stdout if done.returncode in (0, 1) else None


def git_state(repo: Path = REPO) -> tuple[dict, str | None]:
    """({commit, branch, dirty, status}, a patch from HEAD to the working tree when it is dirty).

    The patch covers tracked changes and untracked, not ignored files up to UNTRACKED_MAX_BYTES each,
    so `git apply` on a checkout of the commit rebuilds the code that ran.
    """
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
        "untracked_left_out": [],
    }
    if not dirty:
        return state, None
    patch = _run(["git", "diff", "HEAD", "--binary"], repo) or ""
    for path in (_run(["git", "ls-files", "--others", "--exclude-standard"], repo) or "").splitlines():
        if (repo / path).stat().st_size > UNTRACKED_MAX_BYTES:
            state["untracked_left_out"].append(path)
        elif (part := _untracked_patch(repo, path)) is not None:
            patch += part
    return state, patch


def pip_freeze() -> str:
    """`pip freeze` of this interpreter; the installed distributions when pip is absent."""
    frozen = _run([sys.executable, "-m", "pip", "freeze", "--all"])
    if frozen is not None:
        return frozen
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
    entry = {"session": session, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "argv": sys.argv,
             "git": git, "system": system(), "patch": None}
    if patch is not None:
        entry["patch"] = f"provenance/session-{session}.patch"
        (out / "provenance").mkdir(exist_ok=True)
        (out / entry["patch"]).write_text(patch)
    with log.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(entry) + "\n")
    return entry
