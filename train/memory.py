"""Memory plan: per-GPU estimates of LoRA SFT of the thinker under DeepSpeed ZeRO-2 and ZeRO-3.

    python -m train.memory recipes/cogito.yaml --gpus 8 --gpu-gib 80 [dotted.key=value ...]

The model comes from `model.path/config.json` when the checkpoint is there, else from the real
Qwen3-Omni-30B-A3B thinker's shapes (`core.tiny.REAL_SIZES`). One sample of `data.max_length`
tokens per micro-batch (`train.batch_size` of them), as the longest batch a run can meet.

What is counted, per GPU (a = bytes of `model.dtype`, L = LoRA parameters, N = GPUs):
- weights: every thinker parameter in `model.dtype`; ZeRO-3 keeps 1/N of them, plus the parameters
  it gathers at a time (`stage3_max_live_parameters`, at least the largest unit gathered whole:
  the MoE block, a ZeRO-3 leaf, or the lm_head).
- LoRA: DeepSpeed's bf16 optimizer (ZeRO paper): parameters aL, gradients aL, fp32 master + Adam
  moments 12L, the optimizer part split N ways (ZeRO-3 splits all three). Without DeepSpeed
  (the CPU check): fp32 adapters (peft keeps them fp32), fp32 gradients, two fp32 moments = 16L.
- DeepSpeed buffers: the gradient reduce bucket (`reduce_bucket_size` elements; ZeRO-2 with
  `overlap_comm` holds two).
- activations saved for backward, per token and decoder layer, as transformers saves them (counted
  under 5.20.2, the pin on 2026-12-02; tests/test_memory.py checks the estimate against measured
  peaks under the pin, 5.19.0) with sdpa/flash attention (memory linear in length; counted tensor by tensor on a real-shaped
  layer, see `layer_activation_bytes`); with gradient checkpointing only each layer's input is kept,
  and one layer's activations come back during its recompute, with the gradients of the experts'
  activations and of a few hidden-size tensors while its backward runs.
- logits: the loss upcasts the logits to fp32; at its peak (the start of backward) the fp32
  log-softmax output, its gradient and the logits' gradient are alive: 12 bytes x vocab per
  position. With `train.loss_chunk_tokens` only one chunk of target positions has logits at a time.
- framework reserve (GPU only): CUDA context, NCCL and allocator fragmentation, 2 GiB + 10% of the
  activations and logits.
The audio tower is frozen and gets no gradient: it saves nothing for backward (its forward
transients are far below the logits').

The estimate is checked against measured peaks of the tiny and a real-shaped 1-layer thinker on CPU
(tests/test_memory.py: the tensor bytes allocated, from torch's CPU memory profiler).

A recipe with `grpo.stages` gets the GRPO plan (`grpo_estimate`) instead: the trainer as above on
micro-batches of `train.batch_size` rollout sequences (prompt: the longest clip's audio tokens + a text
allowance, then `grpo.max_new_tokens`), plus what GRPO adds: the per-token log-prob tensors of a rank's
rollouts (old, reference, rollout engine's), the KL reference's copy of the SFT adapter, and the rollouts'
own memory: with `grpo.rollout_engine: hf`, the KV cache of `grpo.rollout_batch_size` sequences at full
length; with `vllm`, the share of the GPU it reserves (`grpo.vllm.gpu_memory_utilization`), which must hold
its weights (split `grpo.vllm.tensor_parallel_size` ways) and the KV cache of every rollout of its group
(G x prompts x full length) at once, else vLLM preempts and re-computes.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from core.recipe import Recipe, load_recipe, split_cli

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30
FRAMEWORK_FIXED = 2 * GIB
FRAGMENTATION = 0.10
LOGIT_BYTES = 12  # fp32 log-softmax output + its gradient + the logits' gradient, per vocabulary entry
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}  # auto: the checkpoint's bf16
PROMPT_TEXT_TOKENS = 256  # a GRPO prompt's text around its audio: chat template, question, choices
VLLM_OVERHEAD = 2 * GIB  # vLLM's own activations, sampler and CUDA graphs inside its share (profiled at start)


def thinker_config(model_path: str | Path):
    """The thinker config of a local checkpoint (thinker-only or composite), else the real 30B-A3B shapes."""
    config_file = Path(model_path) / "config.json"
    if config_file.is_file():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(model_path))
        return getattr(config, "thinker_config", config)
    from core.tiny import REAL_SIZES, build_config

    return build_config(sizes=REAL_SIZES)


def deepspeed_config(stage: int) -> dict:
    """The DeepSpeed settings this repository ships for `stage` (recipes/deepspeed/zero{stage}.json)."""
    return json.loads((REPO / "recipes" / "deepspeed" / f"zero{stage}.json").read_text())["zero_optimization"]


def lora_parameters(config, lora) -> int:
    """Exact LoRA parameter count: the thinker built on the meta device (nothing allocated), LoRA applied."""
    from core.qwen_omni import thinker_class
    from train.lora import apply_lora

    with torch.device("meta"):
        model = thinker_class()._from_config(config)
    model, _ = apply_lora(model, lora)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def layer_activation_bytes(text, lora, act: int, lora_act: int, first: bool = False) -> int:
    """Bytes one decoder layer saves for backward per token (gradient checkpointing off).

    Tensor by tensor, as counted on a real-shaped layer with saved-tensor hooks (transformers 5.20.2 on
    2026-12-02, the pin then; under 5.19.0 since, tests/test_memory.py still holds the estimate within
    10%; sdpa, grouped_mm experts): the RMSNorms keep their fp32 input and 1/rms; LoRA keeps its input
    cast to the adapter dtype (and dropout's mask when dropout > 0) and the rank-r projection;
    attention keeps q, k, v, its output and the fp32 log-sum-exp; the router its fp32 softmax and
    top-k; the experts, per routed (token, expert) pair, gate_up's output, the activation's output and
    the down projection's output. The first layer's input needs no gradient: its q/k/v dropout keeps
    no mask.
    """
    h, hd = text.hidden_size, text.head_dim
    q, kv = text.num_attention_heads * hd, text.num_key_value_heads * hd
    k, m, e = text.num_experts_per_tok, text.moe_intermediate_size, text.num_experts
    norms = 2 * (4 * h + 4) + 4 * (q + text.num_attention_heads) + 4 * (kv + text.num_key_value_heads)
    inputs = {"q_proj": h, "k_proj": h, "v_proj": h, "o_proj": q}
    adapters = 0
    for name in lora.targets:
        if name not in inputs:
            continue  # lm_head's adapter is counted once per token, not per layer
        masked = lora.dropout > 0 and not (first and name != "o_proj")
        adapters += (2 if masked else 1) * lora_act * inputs[name] + lora_act * lora.r
    if lora.experts:  # fused-expert adapters: the rank-r projections of each routed pair's inputs
        adapters += k * lora_act * (h + m + 2 * lora.r)
    attention = act * (2 * q + 2 * kv) + 4 * text.num_attention_heads
    router = 4 * e + 12 * k + 4
    return norms + adapters + attention + router + expert_activation_bytes(text, act)


def expert_activation_bytes(text, act: int) -> int:
    """Per token: gate_up's output, the activation's output and the down projection's output of each
    routed (token, expert) pair, the routing weights and indices."""
    k, m = text.num_experts_per_tok, text.moe_intermediate_size
    return act * k * (3 * m + text.hidden_size) + 24 * k + act * k


@dataclass(frozen=True)
class Plan:
    """One configuration's per-GPU bytes by component (`rows`), and what it is compared with."""

    title: str
    rows: dict[str, int]
    gpu_bytes: int | None = None

    @property
    def total(self) -> int:
        return sum(self.rows.values())

    @property
    def headroom(self) -> int | None:
        return None if self.gpu_bytes is None else self.gpu_bytes - self.total


def estimate(
    config, recipe: Recipe, stage: int | None, gpus: int = 1, tokens: int | None = None,
    lora_params: int | None = None, gpu: bool = True,
) -> dict[str, int]:
    """Peak bytes per rank by component. `stage` 2 or 3: DeepSpeed ZeRO (bf16 optimizer); None: one
    process, torch AdamW, fp32 adapters (how the CPU check trains). `tokens`: per micro-batch
    (default `train.batch_size` x `data.max_length`). `gpu`: add the framework reserve."""
    from core.tiny import parameter_counts

    text = config.text_config
    act = DTYPE_BYTES[recipe.model.dtype]
    tokens = tokens or recipe.train.batch_size * recipe.data.max_length
    counts = parameter_counts(config)
    lora = lora_params if lora_params is not None else lora_parameters(config, recipe.lora)
    deepspeed = stage in (2, 3)
    ds = deepspeed_config(stage) if deepspeed else {}
    lora_act = act if deepspeed else 4  # DeepSpeed's bf16 engine casts the adapters to bf16; peft keeps them fp32

    rows = {"weights": counts.total * act // (gpus if stage == 3 else 1)}
    if stage == 3:
        moe_block = text.num_experts * (3 * text.moe_intermediate_size + 1) * text.hidden_size
        unit = max(moe_block, text.vocab_size * text.hidden_size)
        live = max(int(float(ds.get("stage3_max_live_parameters", 1e9))), unit)
        rows["ZeRO-3 gathered parameters"] = min(live, counts.total) * act  # a small model is gathered whole at most
    if deepspeed:
        shard = gpus
        rows["LoRA parameters"] = act * lora // (shard if stage == 3 else 1)
        rows["LoRA gradients"] = act * lora // (shard if stage == 3 else 1)
        rows["AdamW state (fp32 master + 2 moments)"] = 12 * lora // shard
        buffers = 2 if stage == 2 and ds.get("overlap_comm") else 1
        rows["DeepSpeed reduce buckets"] = buffers * int(float(ds.get("reduce_bucket_size", 5e8))) * act
    else:
        rows["LoRA parameters"] = 4 * lora
        rows["LoRA gradients"] = 4 * lora
        rows["AdamW state (fp32 master + 2 moments)"] = 8 * lora  # torch AdamW: the fp32 weights are the master

    layers = text.num_hidden_layers
    per_layer = layer_activation_bytes(text, recipe.lora, act, lora_act)
    first_layer = layer_activation_bytes(text, recipe.lora, act, lora_act, first=True)
    final_norm = 4 * text.hidden_size + 4
    lm_head_adapter = ((2 if recipe.lora.dropout > 0 else 1) * lora_act * text.hidden_size
                       if "lm_head" in recipe.lora.targets else 0)
    if recipe.train.gradient_checkpointing:
        saved = layers * act * text.hidden_size + final_norm + lm_head_adapter
        # while the recomputed layer's backward runs: the experts' activation gradients, and those of
        # the residual stream (measured on the tiny thinker, where the recompute outweighs the logits)
        recompute = per_layer + expert_activation_bytes(text, act) + 3 * 4 * text.hidden_size
    else:
        saved = first_layer + (layers - 1) * per_layer + final_norm + lm_head_adapter
        recompute = 0
    chunk = recipe.train.loss_chunk_tokens
    logit_positions = min(chunk, tokens) if chunk else tokens
    if chunk:  # the target positions' final hidden states are gathered once for the chunks
        saved += act * text.hidden_size
    logits = LOGIT_BYTES * text.vocab_size * logit_positions
    rows["activations saved for backward"] = saved * tokens
    # the logits' peak (start of backward) and a checkpointed layer's recompute (later) do not overlap
    rows["logits (fp32) + grads, or a layer's recompute"] = max(logits, recompute * tokens)
    if gpu:
        rows["framework reserve"] = FRAMEWORK_FIXED + int(FRAGMENTATION * (saved * tokens + max(logits, recompute * tokens)))
    return rows


def grpo_sequence_tokens(recipe: Recipe) -> int:
    """The longest rollout sequence: the prompt (the clip's audio tokens at data.max_audio_seconds + a text
    allowance) and grpo.max_new_tokens."""
    from core import qwen_omni as qo

    seconds = recipe.data.max_audio_seconds or 30
    audio = qo.audio_token_count(qo.feature_frames(int(seconds * qo.SAMPLE_RATE)))
    return audio + PROMPT_TEXT_TOKENS + recipe.grpo.max_new_tokens


def kv_bytes_per_token(text, act: int, tensor_parallel: int = 1) -> int:
    """K and V of every decoder layer for one token, per GPU of a `tensor_parallel` group (vLLM splits the KV
    heads, and replicates them when there are fewer heads than GPUs)."""
    heads = -(-text.num_key_value_heads // tensor_parallel)
    return 2 * text.num_hidden_layers * heads * text.head_dim * act


def vllm_need(config, recipe: Recipe, gpus: int) -> dict[str, int]:
    """What a rollout engine needs per GPU inside its share: its weights, the KV cache of every rollout of its
    tensor-parallel group at full length at once, vLLM's own overhead."""
    from core.tiny import parameter_counts

    text, act, v = config.text_config, DTYPE_BYTES[recipe.model.dtype], recipe.grpo.vllm
    tp = min(v.tensor_parallel_size, gpus)
    sequences = recipe.train.batch_size * recipe.train.grad_accum * tp  # the group generates its ranks' rollouts
    return {"weights": parameter_counts(config).total * act // tp,
            "KV cache": sequences * grpo_sequence_tokens(recipe) * kv_bytes_per_token(text, act, tp),
            "overhead": VLLM_OVERHEAD}


def grpo_estimate(config, recipe: Recipe, stage: int | None, gpus: int = 1, gpu_bytes: int | None = None,
                  lora_params: int | None = None, gpu: bool = True) -> dict[str, int]:
    """Peak bytes per rank of GRPO: the trainer (`estimate` on micro-batches of rollout sequences) and what GRPO
    adds; `gpu_bytes` sizes vLLM's share (grpo.rollout_engine=vllm)."""
    grpo, cfg = recipe.grpo, recipe.train
    text, act = config.text_config, DTYPE_BYTES[recipe.model.dtype]
    length = grpo_sequence_tokens(recipe)
    rows = estimate(config, recipe, stage, gpus, cfg.batch_size * length, lora_params, gpu)
    lora = lora_params if lora_params is not None else lora_parameters(config, recipe.lora)
    per_rank = cfg.batch_size * cfg.grad_accum
    kept = int(grpo.iterations > 1) + int(grpo.beta > 0) + int(grpo.rollout_engine == "vllm")
    rows["log-probs kept (old, reference, rollout engine's; fp32)"] = kept * per_rank * grpo.max_new_tokens * 4
    if grpo.beta and grpo.init_adapter:
        rows["KL reference: the SFT adapter's copy"] = (act if stage in (2, 3) else 4) * lora
    if grpo.rollout_engine == "hf":
        rows["rollout KV cache (hf generate)"] = grpo.rollout_batch_size * length * kv_bytes_per_token(text, act)
    else:
        rows["vLLM share (grpo.vllm.gpu_memory_utilization)"] = int(grpo.vllm.gpu_memory_utilization * (gpu_bytes or 0))
    return rows


def plans(recipe: Recipe, gpus: int, gpu_gib: float, grpo: bool = False) -> list[Plan]:
    """ZeRO-2 and ZeRO-3, each with gradient checkpointing as the recipe says and the other way round,
    and with the recipe's loss chunking; the recipe's own row first within each stage. `grpo`: GRPO's
    estimate (rollouts, kept log-probs, the rollout engine) instead of SFT's."""
    config = thinker_config(recipe.model.path)
    lora = lora_parameters(config, recipe.lora)
    out = []
    for stage in (2, 3):
        for gc in (recipe.train.gradient_checkpointing, not recipe.train.gradient_checkpointing):
            variant = recipe.model_copy(deep=True)
            variant.train.gradient_checkpointing = gc
            chunk = f", loss chunks {recipe.train.loss_chunk_tokens}" if recipe.train.loss_chunk_tokens else ""
            title = f"{'GRPO ' if grpo else ''}ZeRO-{stage}, grad ckpt {'on' if gc else 'off'}{chunk}"
            estimated = (grpo_estimate(config, variant, stage, gpus, int(gpu_gib * GIB), lora) if grpo
                      else estimate(config, variant, stage, gpus, lora_params=lora))
            out.append(Plan(title, estimated, int(gpu_gib * GIB)))
    return out


def longest_clip(recipe: Recipe) -> str:
    """The line on the longest clip a sample holds: `data.max_audio_seconds` (the Cogito-Pipe's collect drops
    longer clips, training cuts to it) as audio tokens, within the `data.max_length` every plan counts."""
    from core import qwen_omni as qo

    seconds = recipe.data.max_audio_seconds
    if seconds is None:
        return (f"longest clip: data.max_audio_seconds is null (whole clips, any length): a sample's audio is bounded only "
                f"by data.max_length={recipe.data.max_length:,} tokens (longer samples are dropped)")
    tokens = qo.audio_token_count(qo.feature_frames(int(seconds * qo.SAMPLE_RATE)))
    verdict = "fits in" if tokens < recipe.data.max_length else "EXCEEDS"
    return (f"longest clip: data.max_audio_seconds={seconds:g} s = {tokens:,} audio tokens, {verdict} "
            f"data.max_length={recipe.data.max_length:,} (the plans count whole samples of that length)")


def table(plans_: list[Plan]) -> str:
    """Markdown: one column per plan, one row per component, then total, headroom and verdict."""
    names = list(max(plans_, key=lambda p: len(p.rows)).rows)  # ZeRO-3's rows: the others' and more
    lines = ["| per GPU, GiB | " + " | ".join(p.title for p in plans_) + " |", "|---" * (len(plans_) + 1) + "|"]
    for name in names:
        lines.append(f"| {name} | " + " | ".join(f"{p.rows[name] / GIB:.2f}" if name in p.rows else "-" for p in plans_) + " |")
    lines.append("| **total** | " + " | ".join(f"**{p.total / GIB:.1f}**" for p in plans_) + " |")
    lines.append("| headroom | " + " | ".join(f"{p.headroom / GIB:.1f}" for p in plans_) + " |")
    lines.append("| fits | " + " | ".join("yes" if p.headroom >= 0 else "**no**" for p in plans_) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe_and_overrides", nargs="+", metavar="RECIPE [key=value ...]")
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    args = parser.parse_intermixed_args(argv)  # overrides may follow the options
    path, overrides = split_cli(args.recipe_and_overrides)
    recipe = load_recipe(path, overrides)
    grpo = bool(recipe.grpo.stages)
    result = plans(recipe, args.gpus, args.gpu_gib, grpo)
    cfg = recipe.train
    length = grpo_sequence_tokens(recipe) if grpo else recipe.data.max_length
    print(f"memory plan{' (GRPO)' if grpo else ''}: {path}, {args.gpus} x {args.gpu_gib:g} GiB; {recipe.model.path} "
          f"({'config.json' if (Path(recipe.model.path) / 'config.json').is_file() else 'real 30B-A3B shapes: core.tiny.REAL_SIZES'}), "
          f"{recipe.model.dtype}, micro-batch {cfg.batch_size} x {length} tokens"
          f"{' (prompt + grpo.max_new_tokens)' if grpo else ''}, "
          f"LoRA r{recipe.lora.r} on {', '.join(recipe.lora.targets)}{' + experts' if recipe.lora.experts else ''}")
    print(longest_clip(recipe) + "\n")
    print(table(result))
    vllm_short = False
    if grpo and recipe.grpo.rollout_engine == "vllm":
        need = vllm_need(thinker_config(recipe.model.path), recipe, args.gpus)
        share = recipe.grpo.vllm.gpu_memory_utilization * args.gpu_gib * GIB
        vllm_short = sum(need.values()) > share
        print(f"\nvLLM share: {share / GIB:.1f} GiB per GPU (grpo.vllm.gpu_memory_utilization="
              f"{recipe.grpo.vllm.gpu_memory_utilization}, tensor_parallel_size={recipe.grpo.vllm.tensor_parallel_size}); "
              f"needs {sum(need.values()) / GIB:.1f}: " + ", ".join(f"{k} {v / GIB:.1f}" for k, v in need.items())
              + (" -> does NOT hold every rollout at once" if vllm_short else " -> fits"))
    fitting = [p for p in result if p.headroom >= 0 and not vllm_short]
    ours = [p for p in result if f"grad ckpt {'on' if cfg.gradient_checkpointing else 'off'}" in p.title]
    print()
    for plan in ours:
        verdict = f"fits, {plan.headroom / GIB:.1f} GiB headroom" if plan.headroom >= 0 else \
            f"does NOT fit ({-plan.headroom / GIB:.1f} GiB over)"
        print(f"{plan.title}: {plan.total / GIB:.1f} GiB per GPU, {verdict}")
    if cfg.zero_stage:
        chosen = next(p for p in ours if f"ZeRO-{cfg.zero_stage}," in p.title)
        fits = chosen.headroom >= 0 and not vllm_short
        print(f"recipe: train.zero_stage={cfg.zero_stage} -> {'fits' if fits else 'DOES NOT FIT'}")
    return 0 if fitting else 1


if __name__ == "__main__":
    raise SystemExit(main())
