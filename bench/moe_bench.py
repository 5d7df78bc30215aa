"""MoE experts: per-expert loop vs grouped GEMM vs batched GEMM, on one real-shaped MoE block.

    python -m bench.moe_bench                      # CPU, float32, 128 tokens
    python -m bench.moe_bench --device cuda --dtype bfloat16 --tokens 8192

Times forward + backward of the sparse MoE block of Qwen3-Omni-30B-A3B's thinker (hidden 2048,
128 experts of width 768, top-8) for each transformers experts implementation, in the same run.
By default the expert weights are frozen, as under LoRA (gradients flow to the input only);
`--expert-grads` also computes the weight gradients (full fine-tuning, or LoRA on the experts).
"""

from __future__ import annotations

import argparse

import torch

from bench.common import machine, print_table, time_steps, write_json
from core import qwen_omni as qo
from core.tiny import REAL_SIZES, build_config

IMPLEMENTATIONS = ("eager", "grouped_mm", "batched_mm")


def real_moe_block(dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """The thinker's sparse MoE block at its real sizes, random weights, built on `device`."""
    text_config = build_config(sizes=REAL_SIZES, layers=1).text_config
    torch.manual_seed(seed)
    with torch.device(device):
        block = qo.moe_block_class()(text_config).to(dtype)
    std = text_config.initializer_range
    with torch.no_grad():
        for param in block.parameters():  # the router starts at zero: random, else every token picks experts 0-7
            param.normal_(0.0, std)
    return block


def bench(block, tokens: int, train: bool, warmup: int, reps: int, gather_limit_gib: float) -> list[dict]:
    """One row per experts implementation: forward+backward (`train`) or forward only (decode)."""
    config = block.experts.config
    param = block.experts.gate_up_proj
    device, dtype = param.device.type, param.dtype
    hidden = torch.randn(1, tokens, config.hidden_size, device=device, dtype=dtype, requires_grad=train)
    upstream = torch.randn_like(hidden)
    # batched_mm gathers a private copy of its expert's weights for every (token, expert) pair
    gathered_gib = tokens * config.num_experts_per_tok * 3 * config.moe_intermediate_size * config.hidden_size
    gathered_gib *= param.element_size() / 2**30
    rows, baseline = [], None
    for impl in IMPLEMENTATIONS:
        if impl == "batched_mm" and gathered_gib > gather_limit_gib:
            rows.append({"experts": impl, "ms/step": f"skipped: gathers {gathered_gib:.0f} GiB", "tokens/s": "-",
                         "speed-up vs eager": "-"})
            continue
        config._experts_implementation = impl  # what model.set_experts_implementation sets on the text config

        def step():
            if not train:
                with torch.no_grad():
                    return block(hidden)
            hidden.grad = None
            block.zero_grad(set_to_none=True)
            (block(hidden) * upstream).sum().backward()

        seconds = time_steps(step, warmup, reps, device)
        baseline = baseline or seconds
        rows.append({"experts": impl, "ms/step": seconds * 1e3, "tokens/s": tokens / seconds,
                     "speed-up vs eager": baseline / seconds})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--tokens", type=int, default=None, help="tokens per step (default: 8192 on CUDA, 128 on CPU)")
    parser.add_argument("--expert-grads", action="store_true", help="also compute the expert weight gradients")
    parser.add_argument("--decode-tokens", type=int, default=8, help="tokens of the forward-only (decode) case")
    parser.add_argument("--gather-limit-gib", type=float, default=2.0,
                        help="skip batched_mm where its per-pair weight copies would exceed this")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    cuda = args.device.startswith("cuda")
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    tokens = args.tokens or (8192 if cuda else 128)
    block = real_moe_block(dtype, args.device)
    block.experts.requires_grad_(args.expert_grads)
    info = machine()
    grads = "input + expert weight grads" if args.expert_grads else "input grads (experts frozen, as under LoRA)"
    shape = "real shapes (2048 -> 128 experts x 768, top-8)"
    train_rows = bench(block, tokens, True, args.warmup, args.reps, args.gather_limit_gib)
    print_table(train_rows, f"MoE block forward+backward, {shape}, {tokens} tokens, {dtype}, {args.device}, {grads}")
    decode_rows = bench(block, args.decode_tokens, False, args.warmup, args.reps, args.gather_limit_gib)
    print_table(decode_rows, f"MoE block forward only (a decode step of {args.decode_tokens} sequences), {dtype}, {args.device}")
    ratio = train_rows[1]["speed-up vs eager"]
    print(f"training: grouped_mm / eager-loop speed-up {ratio:.2f}x")
    print("machine:", info)
    write_json(args.json, {"train": train_rows, "decode": decode_rows, "tokens": tokens,
                           "decode_tokens": args.decode_tokens, "dtype": str(dtype), "device": args.device,
                           "expert_grads": args.expert_grads, "machine": info})


if __name__ == "__main__":
    main()
