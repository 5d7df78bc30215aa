"""Training step throughput: LoRA SFT steps of the tiny thinker and of a real-shaped thinker with few layers.

    python -m bench.train_bench                              # CPU: tiny model, and a 1-layer real-shaped thinker
    python -m bench.train_bench --device cuda --layers 4     # GPU: bf16, 4 real-shaped layers, batch 8

The step is the real one: examples from train/data.py (synthetic clips of 1-3 s, rendered prompt +
target), its length-grouped batches and collator, LoRA placed by train/lora.py with the LoRA
section of recipes/cogito.yaml, and `train_step` of train/sft.py (forward, backward, clip, AdamW).
The real-shaped thinker is `build_config(sizes=REAL_SIZES, layers=L)` with random weights: real
attention, 128 experts of width 768 (top-8), 152k-word lm_head and, on a GPU, the real audio and
vision towers; it takes the tiny tokenizer's special-token ids, so the same collator feeds it.

Each row runs in a fresh process, so its peak memory (torch.cuda.max_memory_allocated on a GPU,
peak RSS on a CPU) is its own. Rows: gradient checkpointing off/on and group_by_length on/off; the
ratios are against the first row of the same model, measured in the same run.

MFU = 6 x active parameters per token (`parameter_counts(config).training_flops_per_token()`) x
tokens per second (prompt + target, padding excluded) / peak FLOP/s. Under LoRA the frozen
weights get no weight gradients, so the hardware does ~4/6 of that: this is the usual convention,
not the executed FLOPs, and attention's sequence-length term and the audio tower are left out.
The peak is the data sheet's for bf16 on a known GPU (H100 SXM: 989 TFLOP/s dense), else the best
square matmul measured once in the same run (on a CPU: that is the practical peak of a loaded machine).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from bench.common import machine, print_table, write_json

REPO = Path(__file__).resolve().parents[1]
# bf16 dense, no sparsity; the first name the device name contains wins
DATASHEET_PEAK_TFLOPS = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


@dataclass
class Row:
    """One configuration to measure; run by `measure` in its own process."""

    model: str  # "tiny" or "real"
    checkpoint: str  # tiny checkpoint: the processor (and, for "tiny", the weights)
    train_jsonl: str
    device: str
    dtype: str
    batch_size: int
    steps: int | None  # timed steps, from the epoch's first batch; None: the whole epoch
    warmup: int  # untimed steps on the first batches before timing
    passes: int
    gradient_checkpointing: bool
    group_by_length: bool
    layers: int = 1
    shrink_towers: bool = False  # 1 audio / 1 vision layer (CPU: the towers are not what is measured)


def recipe_for(row: Row):
    """recipes/cogito.yaml's LoRA and training settings, on the bench's data and model."""
    from core.recipe import load_recipe

    bf16 = row.dtype == "bfloat16"
    return load_recipe(REPO / "recipes/cogito.yaml", [
        # sdpa (transformers' default), not the recipe's flash_attention_2: it needs no extra package
        f"model.path={row.checkpoint}", f"model.dtype={row.dtype}", "model.attn_implementation=null",
        f"data.train=[{{path: {row.train_jsonl}}}]", "data.num_workers=0",
        f"train.batch_size={row.batch_size}", "train.grad_accum=1", "train.report_to=none",
        "train.mixed_precision=" + ("bf16" if bf16 else "'no'"), "train.output_dir=/tmp/unused",  # YAML: no is False
        f"train.gradient_checkpointing={str(row.gradient_checkpointing).lower()}",
        f"train.group_by_length={str(row.group_by_length).lower()}",
    ])


def build_model(row: Row, recipe, tokenizer):
    from core import qwen_omni as qo
    from core.tiny import REAL_SIZES, build_config, build_thinker

    dtype = getattr(torch, row.dtype)
    if row.model == "tiny":
        return qo.load_thinker(row.checkpoint, row.dtype, row.device)
    towers = dict(audio_layers=1, vision_layers=1) if row.shrink_towers else {}
    return build_thinker(build_config(tokenizer, REAL_SIZES, layers=row.layers, **towers), dtype, row.device)


def matmul_peak_flops(device: str, dtype: torch.dtype) -> float:
    """Best FLOP/s of a square matmul on this device, in this process (the CPU's practical peak)."""
    n = 8192 if device.startswith("cuda") else 2048
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    best = math.inf
    for _ in range(5):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def measure(row: Row) -> dict:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from core import qwen_omni as qo
    from core.tiny import parameter_counts
    from train.data import SFTCollator, SFTDataset, build_examples, epoch_batches
    from train.runtime import prepare_for_training
    from train.sft import train_step

    recipe = recipe_for(row)
    processor = qo.OmniProcessor.from_pretrained(row.checkpoint)
    examples = build_examples(recipe.data, processor, recipe.model.prompt_style, recipe.train.seed, log=lambda *_: None)
    dataset, collate = SFTDataset(examples, recipe.data.max_audio_seconds), SFTCollator(processor)
    order = epoch_batches(examples.lengths, row.batch_size, 1, 1, 0, recipe.train.seed, 0, row.group_by_length)
    if row.steps is not None and len(order) < row.steps:
        raise ValueError(f"{len(examples)} examples make {len(order)} batches of {row.batch_size}; need {row.steps}")
    # Collated up front: the step is timed, not the data pipeline (bench.audio_bench times that).
    # A whole epoch holds the same samples grouped or not, so those rows do the same work.
    batches = [collate([dataset[i] for i in indices]) for indices in order[: row.steps]]

    model = build_model(row, recipe, processor.tokenizer)
    counts = parameter_counts(model.config)
    model, _ = prepare_for_training(model, recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.train.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)  # constant: the schedule costs nothing
    AcceleratorState._reset_state(True)
    accelerator = Accelerator(mixed_precision=recipe.train.mixed_precision, cpu=not row.device.startswith("cuda"))
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()

    cuda = row.device.startswith("cuda")

    def timed(batch) -> tuple[float, dict]:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        stats = train_step(accelerator, model, optimizer, scheduler, params, [batch], recipe.train.max_grad_norm)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start, stats

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for batch in batches[: row.warmup]:
        timed(batch)
    # The best of `passes` passes over the same batches: a loaded machine only ever adds time.
    passes = [[timed(batch) for batch in batches] for _ in range(row.passes)]
    steps = min(passes, key=lambda p: sum(seconds for seconds, _ in p))
    seconds = sum(s for s, _ in steps)
    target_tokens = sum(stats["target_tokens"] for _, stats in steps)
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    padded = sum(b["attention_mask"].numel() for b in batches)
    samples = sum(len(b["ids"]) for b in batches)
    if cuda:
        peak_gib = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    return {
        "seconds": seconds, "steps": len(batches), "samples": samples, "tokens": tokens, "padded_tokens": padded,
        "target_tokens": target_tokens, "peak_gib": peak_gib, "active_params": counts.active_per_token,
        "total_params": counts.total, "achieved_flops": counts.training_flops_per_token() * tokens / seconds,
    }


def peak_flops(device: str, dtype: str) -> tuple[float, str]:
    """(peak FLOP/s, where it comes from): the data sheet's for bf16 on a known GPU, else measured."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else "cpu"
    sheet = next((v for k, v in DATASHEET_PEAK_TFLOPS.items() if k in name), None) if dtype == "bfloat16" else None
    if sheet:
        return sheet * 1e12, f"{name} data sheet, bf16 dense"
    return matmul_peak_flops(device, getattr(torch, dtype)), f"measured {dtype} matmul on {name}"


def run_isolated(row: Row) -> dict:
    """`measure(row)` in a fresh process: its peak memory is this row's alone."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(measure, row).result()


def table_row(row: Row, result: dict, baseline: dict | None, peak: float) -> dict:
    per_s = result["target_tokens"] / result["seconds"]
    return {
        "model": "tiny" if row.model == "tiny" else f"real-shaped, {row.layers} layer(s)",
        "grad ckpt": "on" if row.gradient_checkpointing else "off",
        "group_by_length": "on" if row.group_by_length else "off",
        "batch": row.batch_size,
        "padding %": 100 * (1 - result["tokens"] / result["padded_tokens"]),
        "step ms": 1e3 * result["seconds"] / result["steps"],
        "samples/s": result["samples"] / result["seconds"],
        "target tok/s": per_s,
        "all tok/s": result["tokens"] / result["seconds"],
        "peak GiB": result["peak_gib"],
        "MFU %": 100 * result["achieved_flops"] / peak,
        "vs first row": per_s / (baseline["target_tokens"] / baseline["seconds"]) if baseline else 1.0,
    }


def main(argv: list[str] | None = None) -> None:
    from core.tiny import build_tiny_checkpoint
    from data_prep.synthetic import generate as make_synthetic

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=["tiny", "real"], choices=["tiny", "real"])
    parser.add_argument("--layers", type=int, default=None, help="real-shaped text layers (default: 4 on CUDA, 1 on CPU)")
    parser.add_argument("--batch-size", type=int, default=None, help="real-shaped batch (default: 8 on CUDA, 1 on CPU)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: the whole epoch; 2 for the CPU real-shaped rows)")
    parser.add_argument("--items", type=int, default=64, help="synthetic training examples")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here")

    with tempfile.TemporaryDirectory(prefix="train-bench-") as tmp:
        tmp = Path(tmp)
        checkpoint = str(build_tiny_checkpoint(tmp / "tiny-omni"))
        make_synthetic(tmp / "synthetic", train=args.items, test=0, seed=0)
        common = dict(checkpoint=checkpoint, train_jsonl=str(tmp / "synthetic" / "train.jsonl"), device=args.device)
        plans = []
        if "tiny" in args.models:
            tiny = dict(model="tiny", dtype="float32", batch_size=4, steps=args.steps, warmup=1, passes=3, **common)
            plans.append(("tiny thinker (0.9M parameters), float32", [
                Row(**tiny, gradient_checkpointing=False, group_by_length=True),
                Row(**tiny, gradient_checkpointing=True, group_by_length=True),
                Row(**tiny, gradient_checkpointing=False, group_by_length=False),
            ]))
        if "real" in args.models:
            layers = args.layers or (4 if cuda else 1)
            real = dict(model="real", layers=layers, dtype="bfloat16" if cuda else "float32",
                        batch_size=args.batch_size or (8 if cuda else 1), steps=args.steps or (None if cuda else 2),
                        warmup=2 if cuda else 1, passes=2 if cuda else 1, shrink_towers=not cuda, **common)
            title = (f"real-shaped thinker, {layers} text layer(s), {real['dtype']}"
                     + (", 1 audio + 1 vision layer (CPU)" if not cuda else ", real audio + vision towers"))
            rows = [Row(**real, gradient_checkpointing=False, group_by_length=True),
                    Row(**real, gradient_checkpointing=True, group_by_length=True)]
            if real["batch_size"] > 1:  # one sample a batch has no padding to save
                rows.append(Row(**real, gradient_checkpointing=False, group_by_length=False))
            plans.append((title, rows))

        results = {}
        for title, rows in plans:
            # One peak per table, measured here once: the rows' MFU ratios are their throughput ratios.
            peak, source = peak_flops(args.device, rows[0].dtype)
            table, raw = [], []
            for row in rows:
                result = run_isolated(row)
                raw.append({"row": asdict(row), **result})
                table.append(table_row(row, result, raw[0] if table else None, peak))
            results[title] = {"table": table, "raw": raw, "peak_flops": peak, "peak_source": source}
            first = raw[0]
            print_table(table, f"LoRA SFT steps (recipes/cogito.yaml LoRA: r16, q/k/v/o), {title}, {args.device}; "
                               f"{first['active_params'] / 1e6:,.1f}M active / {first['total_params'] / 1e6:,.1f}M "
                               f"parameters; MFU against {peak / 1e12:.3g} TFLOP/s ({source})")
    if not cuda and "real" in args.models:
        print("note: CPU run. The real-shaped rows use 1 text layer, 1 audio and 1 vision layer, batch 1 and "
              "the short synthetic samples (~200 tokens); their lm_head (152k x 2048) is most of the active "
              "parameters, unlike the 48-layer model. GPU figures: python -m bench.train_bench --device cuda")
    info = machine()
    print("machine:", info)
    write_json(args.json, {"results": results, "device": args.device, "machine": info})


if __name__ == "__main__":
    main()
