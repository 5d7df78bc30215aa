"""Where the self-improvement loop (train/rest.py) leaves each iteration's SFT data: LOOP/iter-N/data.json lists the
files, LOOP/iter-N/sft is the iteration's SFT run. Read by the loop and by the audit bundle, which declares them."""

from __future__ import annotations

import json
from pathlib import Path


def iteration_manifests(rest_dir: str | Path, up_to: int | None = None) -> list[Path]:
    """data.json of every iteration of the loop in `rest_dir` (those up to `up_to`), in order."""
    found = sorted(Path(rest_dir).glob("iter-*/data.json"), key=lambda p: int(p.parent.name.split("-")[1]))
    return [p for p in found if up_to is None or int(p.parent.name.split("-")[1]) <= up_to]


def iteration_data(rest_dir: str | Path, up_to: int | None = None) -> list[Path]:
    """Every SFT file the loop in `rest_dir` wrote, iteration by iteration (the audit bundle declares them)."""
    return [Path(f["path"]) for manifest in iteration_manifests(rest_dir, up_to)
            for f in json.loads(manifest.read_text())["files"]]


def loop_of(train_run: str | Path) -> tuple[Path, int] | None:
    """(the loop's folder, iteration) when `train_run` is the SFT of a loop iteration (LOOP/iter-N/sft), else None."""
    run = Path(train_run)
    iteration = run.parent.name.removeprefix("iter-")
    if run.name == "sft" and iteration.isdigit() and (run.parent / "data.json").is_file():
        return run.parent.parent, int(iteration)
    return None
