"""Host memory of loading the thinker per rank: ZeRO-3 (sharded from creation on) against ZeRO-2.

    python -m bench.load_bench                  # real-shaped 1-layer thinker (1.33B parameters, bf16), 2 CPU ranks
    python -m bench.load_bench --modes zero2 zero3   # without transformers' own ZeRO-3 load (the most memory)

Writes the real 30B-A3B thinker's shapes with 1 text, 1 audio and 1 vision layer as a bf16 checkpoint
(2.5 GB) in the real checkpoint's layout (`qo.save_thinker`: per-expert weights that transformers fuses
while loading, 1 GB shards), then per mode launches 2 gloo ranks under DeepSpeed (recipes/accelerate/cpu_zero{2,3}_2proc.yaml)
that each do what train/sft.py does before training: create the Accelerator, then
`train.zero3.load_thinker_zero3` under ZeRO-3 (the streaming loader), `core.qwen_omni.load_thinker` otherwise;
mode zero3-stock loads with transformers' own ZeRO-3 path instead (`from_pretrained`, what
`load_thinker` did before). Each rank reports its peak RSS (VmHWM: anonymous
memory + the checkpoint's pages it touched through mmap) and its peak anonymous memory (RssAnon,
sampled every 10 ms: what cannot be shared with other ranks or dropped), minus what it held before
loading, and the parameter bytes it holds afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import machine, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(checkpoint: str, out_dir: str, mode: str) -> None:
    """One rank: the Accelerator, then the thinker as the trainers load it (or as `mode` says); writes rank{R}.json."""
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs

    from core import qwen_omni as qo
    from train.runtime import zero_stage
    from train.zero3 import load_thinker_zero3

    # bf16 as recipes/cogito.yaml trains: DeepSpeed's zero.Init takes the parameters' dtype from it
    accelerator = Accelerator(mixed_precision="bf16", kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    stage = zero_stage(accelerator)
    accelerator.wait_for_everyone()
    anon_before, rss_before = status_kib("RssAnon"), status_kib("VmRSS")
    peak_anon = [anon_before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], status_kib("RssAnon"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    if mode == "zero3-stock":
        model = qo.thinker_class().from_pretrained(checkpoint, dtype=torch.bfloat16)
    else:
        model = (load_thinker_zero3 if stage == 3 else qo.load_thinker)(checkpoint, "bfloat16")
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    held = sum(getattr(p, "ds_tensor", p).numel() * p.element_size() for p in model.parameters())  # ZeRO-3: the shard
    full = sum(qo.full_numel(p) * p.element_size() for p in model.parameters())
    result = {
        "rank": accelerator.process_index, "stage": stage, "seconds": seconds,
        "peak_rss_gib": (status_kib("VmHWM") - rss_before) / 2**20,
        "peak_anon_gib": (peak_anon[0] - anon_before) / 2**20,
        "held_param_gib": held / GIB, "model_param_gib": full / GIB, "torch": torch.__version__,
    }
    Path(out_dir, f"rank{accelerator.process_index}.json").write_text(json.dumps(result))


MODES = {"zero2": "ZeRO-2", "zero3": "ZeRO-3 streaming", "zero3-stock": "ZeRO-3 transformers"}


def launch(mode: str, checkpoint: Path, out_dir: Path) -> list[dict]:
    out_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    stage = 2 if mode == "zero2" else 3
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(REPO / f"recipes/accelerate/cpu_zero{stage}_2proc.yaml"), "-m", "bench.load_bench",
           "--worker", str(checkpoint), str(out_dir), mode]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{MODES[mode]} launch failed:\n{done.stderr[-4000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in (0, 1)]


def write_checkpoint(out: Path) -> Path:
    import torch

    from core import qwen_omni as qo
    from core.tiny import REAL_SIZES, build_config, build_thinker

    model = build_thinker(build_config(sizes=REAL_SIZES, layers=1, audio_layers=1, vision_layers=1), torch.bfloat16)
    # the real checkpoint's layout: composite config, thinker.-prefixed per-expert weights, 1 GB shards
    return qo.save_thinker(model, out, model.config.to_dict(), max_shard_size="1GB")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=3, metavar=("CHECKPOINT", "OUT_DIR", "MODE"), help=argparse.SUPPRESS)
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.worker:
        worker(*args.worker)
        return
    with tempfile.TemporaryDirectory(prefix="load-bench-") as tmp:
        checkpoint = write_checkpoint(Path(tmp) / "real-1layer")
        results = {mode: launch(mode, checkpoint, Path(tmp) / mode) for mode in args.modes}
    rows = []
    for mode, ranks in results.items():
        for r in ranks:
            zero2 = results["zero2"][r["rank"]] if "zero2" in results else None
            rows.append({
                "mode": MODES[mode], "rank": r["rank"], "model GiB (bf16)": r["model_param_gib"],
                "held after loading GiB": r["held_param_gib"], "peak RSS GiB": r["peak_rss_gib"],
                "peak anonymous GiB": r["peak_anon_gib"], "load s": r["seconds"],
                "peak anonymous vs ZeRO-2": r["peak_anon_gib"] / zero2["peak_anon_gib"] if zero2 else None,
            })
    print_table(rows, "Loading the real-shaped 1-layer thinker (1 text, 1 audio, 1 vision layer; bf16) on 2 CPU ranks, "
                      "per rank, above what the rank held before loading")
    info = machine()
    print("machine:", info)
    write_json(args.json, {"rows": rows, "raw": results, "machine": info})


if __name__ == "__main__":
    main()
