"""Fold a LoRA adapter into the thinker's weights and save a checkpoint in the base's layout.

    python train/merge.py --base artifacts/tiny-omni --adapter runs/tiny/adapter --out runs/tiny/merged

The result has the released checkpoint's layout (`core.qwen_omni.CHECKPOINT_FILES`): the base's
composite config.json (a thinker-only base's config is wrapped into one), `thinker.`-prefixed
tensors in `model-0000N-of-0000M.safetensors` shards no larger than the base's, their index, and
every tokenizer, chat-template, processor and generation file of the base copied byte for byte
(preprocessor_config.json keeps its processor_class). So a merged folder replaces the base in
every command, and vLLM, which cannot apply a LoRA adapter to this model (see
docs/qwen3_omni.md), serves it like the base. The merge runs in the base's dtype (bf16
for the real model: ~63 GB of CPU RAM for the 30B thinker).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

from core import qwen_omni as qo  # noqa: E402
from core.outdir import FolderRefused, check_apart, replacing  # noqa: E402

MAKER = "train/merge.py"


def merge(base: str | Path, adapter: str | Path, out: str | Path, dtype: str = "auto") -> Path:
    base, out = Path(base), Path(out)
    check_apart(out, {"the base checkpoint": base, "the adapter": adapter})
    # built beside `out`, swapped in when whole; an existing `out` is replaced only if a merge made it
    with replacing(out, MAKER) as staging:
        model = qo.load_thinker(base, dtype)
        merged = qo.load_adapter(model, adapter).merge_and_unload()
        shard_size = max(p.stat().st_size for p in qo.weight_files(base) if p.suffix == ".safetensors")
        qo.save_thinker(merged, staging, json.loads((base / "config.json").read_text()), max_shard_size=shard_size)
        qo.copy_checkpoint_files(base, staging)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="base checkpoint folder (Qwen3-Omni, or a thinker-only one)")
    parser.add_argument("--adapter", required=True, help="LoRA adapter folder written by train/sft.py")
    parser.add_argument("--out", required=True, help="folder for the merged checkpoint")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = parser.parse_args(argv)
    try:
        out = merge(args.base, args.adapter, args.out, args.dtype)
    except FolderRefused as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"merged checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
