"""One rank of the ZeRO-3 streaming-load test (tests/test_memory.py), launched 2x by accelerate on gloo.

    accelerate launch --config_file recipes/accelerate/cpu_zero3_2proc.yaml tests/zero3_load_worker.py CHECKPOINT BROKEN OUT

Loads CHECKPOINT as train/sft.py does under ZeRO-3 (Accelerator in bf16, then `load_thinker_zero3`)
and writes OUT/rank{R}.pt: the parameter elements this rank holds, then, gathered, every parameter,
buffer and the logits of one forward with audio; then tries BROKEN, which must fail on every rank.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root


def forward_batch(checkpoint: str) -> dict:
    """One prompt with a 1.5 s noise clip: the audio tower, its positions and the text rotary all take part."""
    import numpy as np

    from core import qwen_omni as qo

    processor = qo.OmniProcessor.from_pretrained(checkpoint)
    prompt = qo.render_prompt(processor.tokenizer, "What is heard?", ["(A) a tone", "(B) speech"])
    audio = np.random.default_rng(0).standard_normal(24_000).astype(np.float32) * 0.1
    return processor([prompt], audios=[audio])


def main(checkpoint: str, broken: str, out: str) -> None:
    import deepspeed
    import torch
    from accelerate import Accelerator, InitProcessGroupKwargs

    from train.zero3 import load_thinker_zero3

    accelerator = Accelerator(mixed_precision="bf16", kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    model = load_thinker_zero3(checkpoint, "bfloat16")
    result = {"held": sum(p.ds_tensor.numel() for p in model.parameters()), "training": model.training,
              "config_dtype": str(model.config.dtype), "generation": model.generation_config.to_dict()}
    with deepspeed.zero.GatheredParameters(list(model.parameters())), torch.no_grad():
        result["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        result["buffers"] = {n: b.clone() for n, b in model.named_buffers()}
        result["logits"] = model(**forward_batch(checkpoint)).logits
    try:
        load_thinker_zero3(broken, "bfloat16")
    except ValueError as err:
        result["broken"] = str(err)
    torch.save(result, Path(out) / f"rank{accelerator.process_index}.pt")


if __name__ == "__main__":
    main(*sys.argv[1:])
