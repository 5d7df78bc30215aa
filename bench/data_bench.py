"""Training start at Audio-Cogito scale: cold and warm start, peak RSS per rank, for 1 and 2 ranks.

    python -m bench.data_bench                               # 100k synthetic SFT records, 1 and 2 ranks
    python -m bench.data_bench --records 25000 100000        # two sizes: also a linear fit to 545k records

N synthetic SFT records (~1.3k-character reasoning, 4 choices) over a pool of real WAV files (1-30 s,
8 and 16 kHz, so that half the clips are resampled), written once under --workdir. For each rank
count, `train/sft.py` runs one optimizer step of the tiny thinker (launched with torch.distributed.run,
gloo on a CPU) twice on the same data-cache folder: cold (empty folder: the cache is built) and warm
(it is loaded). Each rank reports the seconds from the launch to the end of its run (imports, model,
data, one step, a checkpoint), the seconds `build_examples` took, its own peak RSS and that of its
largest child (the cache's build workers), and the CPU seconds it and its children used (on a machine
shared with other work, wall seconds grow with the load; CPU seconds hardly do). A row's figure is
the slowest / largest rank's.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

from bench.common import machine, print_table, write_json
from core.outdir import check_replaceable, mark

REPO = Path(__file__).resolve().parents[1]
MAKER = "bench.data_bench"
AUDIO_COGITO_RECORDS = 545_000
GOAL = {"cold_s": 120, "warm_s": 30, "peak_rss_gib": 3.0}  # issue 19, 100k records on 2 CPU cores
WORDS = ("the first second third tone beep onset pitch rises falls louder softer than before after clip sound "
         "voice speaker music melody rhythm noise background event count frequency higher lower longer shorter "
         "so therefore hence which answer option matches because interval silence energy spectrum").split()


def generate(folder: Path, records: int, clips: int, seed: int = 0) -> Path:
    """`folder`/train.jsonl with `records` SFT records over `clips` WAV files in `folder`/../audio; kept for reuse."""
    from core.audio import write_wav

    data = folder / "train.jsonl"
    if data.is_file():
        return data
    rng = np.random.default_rng(seed)
    audio = folder.parent / f"audio-{clips}"
    if not (audio / "done").is_file():
        audio.mkdir(parents=True, exist_ok=True)
        for i in range(clips):
            rate = (8_000, 16_000)[i % 2]
            t = np.arange(int(rng.uniform(1, 30) * rate)) / rate
            write_wav(audio / f"clip{i:04d}.wav", (0.3 * np.sin(2 * np.pi * rng.uniform(200, 2000) * t)).astype(np.float32), rate)
        (audio / "done").write_text("")
    folder.mkdir(parents=True, exist_ok=True)
    words = np.array(WORDS, dtype=object)
    tmp = data.with_suffix(".tmp")
    with tmp.open("w") as handle:
        for i in range(records):
            thinking = " ".join(words[rng.integers(0, len(words), 200 + int(rng.integers(0, 60)))])
            choices = [f"option {c} for item {i}" for c in "abcd"]
            handle.write(json.dumps({
                "id": f"syn-{i:07d}", "audio_path": f"../audio-{clips}/clip{int(rng.integers(clips)):04d}.wav",
                "question": f"Item {i}: which of the sounds comes first, and how many tones are there in the clip?",
                "choices": choices, "answer": choices[int(rng.integers(4))], "thinking": thinking,
                "source": "bench", "domain": "sound", "licence": "generated",
            }) + "\n")
    tmp.rename(data)
    return data


def launch(ranks: int, recipe: Path, report: Path, overrides: list[str]) -> None:
    report.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline",
           "TOKENIZERS_PARALLELISM": "false", "BENCH_T0": repr(time.time())}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", "--master_addr=127.0.0.1",
           f"--master_port={port}", "-m", "bench.data_bench", "rank", str(report), str(recipe), *overrides]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-4000:]}")


def rank_main(report: Path, argv: list[str]) -> None:
    """One rank: train/sft.py's main with `build_examples` timed; writes report/rank{R}.json."""
    t0 = float(os.environ["BENCH_T0"])
    import train.sft as sft

    timed = {}
    build_examples = sft.build_examples

    def timed_build(*args, **kwargs):
        start = time.perf_counter()
        examples = build_examples(*args, **kwargs)
        timed["data_s"] = time.perf_counter() - start
        return examples

    sft.build_examples = timed_build
    assert sft.main(argv) == 0
    rank = int(os.environ.get("RANK", "0"))
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    (report / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "pid": os.getpid(), "start_s": time.time() - t0, **timed,
        # CPU seconds do not grow with the machine's load as wall seconds do
        "cpu_s": own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime,
        "own_cpu_s": own.ru_utime + own.ru_stime,
        "peak_rss_gib": own.ru_maxrss / 2**20, "children_peak_rss_gib": children.ru_maxrss / 2**20,
    }))


def measure(ranks: int, data: Path, checkpoint: Path, work: Path) -> list[dict]:
    """Cold then warm start of `ranks` ranks on one cache folder; one result per start."""
    run = work / f"ranks{ranks}"
    check_replaceable(run, MAKER)  # a fresh folder each time, replacing only one this script made
    shutil.rmtree(run, ignore_errors=True)
    recipe = run / "recipe.yaml"
    run.mkdir(parents=True)
    mark(run, MAKER)
    recipe.write_text(yaml.safe_dump({
        "name": "data-bench",
        "model": {"path": str(checkpoint), "dtype": "float32"},
        "data": {"train": [{"path": str(data)}], "max_length": 8192, "cache": str(run / "cache")},
        "train": {"output_dir": str(run / "out"), "max_steps": 1, "batch_size": 1, "report_to": "none", "seed": 0},
    }))
    results = []
    for start in ("cold", "warm"):
        shutil.rmtree(run / "out", ignore_errors=True)  # a fresh run each time: no resume
        report = run / f"report-{start}"
        launch(ranks, recipe, report, [])
        per_rank = [json.loads((report / f"rank{r}.json").read_text()) for r in range(ranks)]
        infos = [json.loads(p.read_text()) for p in (run / "cache").glob("*/info.json")]
        results.append({"start": start, "ranks": per_rank, "builds": len(infos),
                        "built_by_a_rank": all(i["built_by"]["pid"] in {r["pid"] for r in per_rank} for i in infos),
                        "build_s": infos[0]["build_seconds"], "build_workers": infos[0]["workers"]})
    return results


def table_row(records: int, ranks: int, result: dict, cold: dict | None) -> dict:
    worst = lambda key: max(r.get(key, 0.0) for r in result["ranks"])
    return {
        "records": records, "ranks": ranks, "start": result["start"],
        "start s (slowest rank)": worst("start_s"), "data s": worst("data_s"), "CPU s (rank + its workers)": worst("cpu_s"),
        "CPU s (rank)": worst("own_cpu_s"),
        "vs cold": cold and worst("start_s") / max(r["start_s"] for r in cold["ranks"]),
        "peak RSS GiB / rank": worst("peak_rss_gib"), "build worker peak GiB": worst("children_peak_rss_gib"),
        "cache builds": result["builds"] if result["start"] == "cold" else 0,
        "built in": f"{result['build_s']:.1f} s, {result['build_workers']} proc" if result["start"] == "cold" else "-",
    }


def extrapolate(rows: list[dict], target: int) -> list[dict]:
    """Per rank count: a straight line through the cold starts of the two sizes measured, read at `target`.

    Only the cold start grows with the records (the build); a warm start's data part and the peak RSS
    barely do (a few arrays), so a line through two noisy points of them says nothing."""
    out = []
    sizes = sorted({r["records"] for r in rows})
    for ranks in sorted({r["ranks"] for r in rows}):
        a, b = (next(r for r in rows if (r["records"], r["ranks"], r["start"]) == (n, ranks, "cold")) for n in sizes[:2])
        out.append({"records": target, "ranks": ranks, "start": "cold", **{
            name: a[key] + (b[key] - a[key]) * (target - a["records"]) / (b["records"] - a["records"])
            for name, key in (("start s", "start s (slowest rank)"), ("data s", "data s"), ("CPU s", "CPU s (rank + its workers)"))}})
    return out


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rank"]:
        return rank_main(Path(argv[1]), argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, nargs="+", default=[100_000], help="sizes; two give a fit to 545k")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--clips", type=int, default=256, help="distinct WAV files the records point at")
    parser.add_argument("--workdir", default="runs/bench/data_bench", help="generated data (kept), caches and runs")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from core.tiny import build_tiny_checkpoint

    work = Path(args.workdir).resolve()
    checkpoint = work / "tiny-omni"
    if not (checkpoint / "config.json").is_file():
        build_tiny_checkpoint(checkpoint)
    rows, raw = [], []
    for records in args.records:
        data = generate(work / f"records-{records}", records, args.clips)
        print(f"{records:,} records: {data} ({data.stat().st_size / 2**20:.0f} MiB)", flush=True)
        for ranks in args.ranks:
            results = measure(ranks, data, checkpoint, work)
            raw.append({"records": records, "ranks": ranks, "results": results})
            for result in results:
                rows.append(table_row(records, ranks, result, results[0] if result["start"] == "warm" else None))
                print(rows[-1], flush=True)
    info = machine()
    print_table(rows, f"Training start (train/sft.py, 1 step of the tiny thinker): cold = the data cache is built, "
                      f"warm = it is loaded; load average {info['load_avg_1m']}")
    goals = []
    for row in rows:
        if row["records"] == 100_000:
            limit = GOAL["cold_s" if row["start"] == "cold" else "warm_s"]
            goals.append(f"{row['ranks']} rank(s) {row['start']}: {row['start s (slowest rank)']:.0f} s (goal <= {limit}), "
                         f"{row['peak RSS GiB / rank']:.2f} GiB/rank (goal <= {GOAL['peak_rss_gib']})"
                         + (f", {row['cache builds']} build(s)" if row["start"] == "cold" else ""))
    if goals:
        print("issue 19 goals at 100k records:\n  " + "\n  ".join(goals))
    fit = extrapolate(rows, AUDIO_COGITO_RECORDS) if len(set(args.records)) >= 2 else []
    if fit:
        print_table(fit, f"Linear fit through {sorted(set(args.records))[:2]} records, read at {AUDIO_COGITO_RECORDS:,}")
    print("machine:", info)
    write_json(args.json, {"rows": rows, "fit_545k": fit, "raw": raw, "machine": info})


if __name__ == "__main__":
    main()
