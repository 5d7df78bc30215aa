"""Fold a LoRA adapter into the thinker's weights and save a plain checkpoint.

    python train/merge.py --base artifacts/tiny-omni --adapter runs/tiny/adapter --out runs/tiny/merged

The result is a thinker-only checkpoint (`Qwen3OmniMoeThinkerForConditionalGeneration`) with the
tokenizer, chat template and feature extractor beside it: `core.qwen_omni.load_thinker` and
`OmniProcessor.from_pretrained` load it like the base, and servers that cannot apply a LoRA
adapter to this model (vLLM, see ../shared/QWEN3_OMNI_NOTES.md) can serve it. The merge runs in
the base's dtype (bf16 for the real model: ~60 GB of CPU RAM for the 30B thinker).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

from core import qwen_omni as qo  # noqa: E402

# Files of the base that describe the processor rather than the weights; copied when the saved
# tokenizer/feature extractor did not already write them (chat_template.json of real checkpoints).
PROCESSOR_SUFFIXES = (".json", ".jinja", ".txt", ".model")
WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


def merge(base: str | Path, adapter: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    from peft import PeftModel

    out = Path(out)
    model = qo.load_thinker(base, dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(out)
    processor = qo.OmniProcessor.from_pretrained(base)
    processor.tokenizer.save_pretrained(out)
    processor.feature_extractor.save_pretrained(out)
    for path in Path(base).iterdir():
        if path.suffix in PROCESSOR_SUFFIXES and path.name not in WEIGHT_FILES and not (out / path.name).exists():
            shutil.copy2(path, out / path.name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base checkpoint folder (thinker-only or full Qwen3-Omni)")
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder written by train/sft.py")
    parser.add_argument("--out", required=True, help="folder for the merged thinker checkpoint")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    out = merge(args.base, args.adapter, args.out, args.dtype)
    print(f"merged thinker written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
