"""Checkpoint files: the released checkpoint's layout, loading the thinker and its tokenizer, and saving
in that layout (composite config, `thinker.*` shards and their index)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError

from core.qwen_omni.model import modeling_module, thinker_class

# The files of the released Qwen/Qwen3-Omni-30B-A3B-Thinking and their roles (docs/real_checkpoint.md
# says where each was verified). The tiny kit writes the same set; merge writes the weight files anew and
# carries every other file over from its base byte for byte.
CHECKPOINT_FILES = {
    "config.json": "composite config: Qwen3OmniMoeForConditionalGeneration, thinker_config, enable_audio_output false",
    "model-0000N-of-0000M.safetensors": "weight shards, every tensor named thinker.*",
    "model.safetensors.index.json": "tensor name -> shard",
    "generation_config.json": "sampling defaults of the Thinking model",
    "chat_template.json": "the chat template, read by the processor (not by AutoTokenizer)",
    "preprocessor_config.json": "WhisperFeatureExtractor + Qwen2VLImageProcessor settings, processor_class",
    "tokenizer_config.json": "tokenizer attributes and special tokens, no chat template",
    "vocab.json": "byte-level BPE vocabulary",
    "merges.txt": "byte-level BPE merges",
}
SHARD_PATTERN = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
WEIGHT_INDEX = "model.safetensors.index.json"
THINKER_PREFIX = "thinker."
# Where a chat template can live, in the order transformers' processor looks (5.x).
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


# A full Qwen3-Omni checkpoint also holds the speech generator (talker, code2wav): loading the thinker skips
# their tensors (transformers reports them as unexpected), as train/zero3.py's weight plan does.
OTHER_SUBMODELS = ("talker.", "code2wav.")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class CheckpointNotFound(FileNotFoundError):
    """A checkpoint path that is no local folder (and the hub is not allowed)."""


class CheckpointError(ValueError):
    """Weights that cannot be what the checkpoint says: a weight file truncated, missing or unreadable, or
    tensors that do not match its config (a model's) or its adapter_config.json (a LoRA adapter's)."""


def checkpoint_source(path: str | Path, allow_hub: bool = False) -> str:
    """What to hand `from_pretrained`: a local folder, always looked for first; a hub id (owner/name) only
    with `allow_hub` (recipe key model.allow_hub), since nothing should download at run time by surprise."""
    local = Path(path)
    if local.is_dir():
        return str(local)
    hub_id = not local.is_absolute() and len(local.parts) == 2 and not str(path).startswith(".")
    if allow_hub and hub_id:
        return str(path)
    hint = (f"download it first (huggingface-cli download {path} --local-dir checkpoints/{local.name}) and point at "
            "that folder, or set model.allow_hub=true to let transformers fetch it") if hub_id else "check the path"
    raise CheckpointNotFound(f"{path}: no local checkpoint folder there; {hint}")


def load_thinker(
    path: str | Path,
    dtype: str = "auto",
    device: str | None = None,
    attn_implementation: str | None = None,
    experts_implementation: str | None = None,
    allow_hub: bool = False,
):
    """The thinker alone, from a thinker checkpoint or a full Qwen3-Omni checkpoint (talker skipped).

    `experts_implementation`: how the fused MoE experts run ("grouped_mm", "batched_mm" or the
    per-expert "eager" loop); None keeps transformers' default (grouped_mm where it can dispatch).
    Training under DeepSpeed ZeRO-3 loads with `train.zero3.load_thinker_zero3` instead (same arguments
    but `device`): each rank reads only its own shard.
    """
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    source = checkpoint_source(path, allow_hub)
    if Path(source).is_dir():
        for shard in shard_files(source):
            check_weight_file(shard)
    try:
        model, info = thinker_class().from_pretrained(source, output_loading_info=True, **kwargs)
    except SafetensorError as err:  # checked above; this names the folder if a file changed since
        raise CheckpointError(f"{source}: unreadable weights ({err})") from None
    unexpected = {key for key in info["unexpected_keys"] if not key.startswith(OTHER_SUBMODELS)}
    _check_keys(source, "the thinker's weights do not match its config.json", info["missing_keys"], unexpected)
    if device:
        model = model.to(device)
    return model


def load_adapter(model, adapter: str | Path, is_trainable: bool = False):
    """`model` with the LoRA `adapter` folder on top (a peft `PeftModel`); `CheckpointError` naming the file
    when its weights are truncated or unreadable, or when its tensors are not exactly the LoRA its
    adapter_config.json places on this model (peft itself only warns of missing ones, and drops extra ones)."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors import safe_open

    weights = Path(adapter) / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise CheckpointError(f"{weights}: missing: a LoRA adapter folder holds adapter_config.json and {ADAPTER_WEIGHTS}")
    check_weight_file(weights)
    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=is_trainable)
        with safe_open(str(weights), "pt") as handle:
            stored = set(handle.keys())
    except SafetensorError as err:
        raise CheckpointError(f"{weights}: unreadable ({err})") from None
    lora = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    allowed = lora | set(get_peft_model_state_dict(model, save_embedding_layers="auto"))  # e.g. lm_head's own weight
    _check_keys(weights, "the adapter's tensors do not match the LoRA its adapter_config.json places", lora - stored,
               stored - allowed)
    return model


def _check_keys(where: str | Path, what: str, missing, unexpected) -> None:
    """`CheckpointError` listing the missing and unexpected tensor names, if there are any."""
    if missing or unexpected:
        raise CheckpointError(f"{where}: {what}: missing {_listed(missing)}; unexpected {_listed(unexpected)}")


def _listed(keys, shown: int = 8) -> str:
    keys = sorted(keys)
    if not keys:
        return "none"
    more = f" and {len(keys) - shown} more" if len(keys) > shown else ""
    return f"{len(keys)} ({', '.join(keys[:shown])}{more})"


def shard_files(folder: str | Path) -> list[Path]:
    """The safetensors files holding a local checkpoint's weights: those its index names (each must exist), else
    model.safetensors where there is one."""
    folder = Path(folder)
    index = folder / WEIGHT_INDEX
    if not index.is_file():
        return [path] if (path := folder / "model.safetensors").is_file() else []
    try:
        names = json.loads(index.read_text())["weight_map"].values()
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{index}: unreadable weight index ({type(err).__name__}: {err})") from None
    return sorted({folder / name for name in names})


def check_weight_file(path: str | Path) -> None:
    """`CheckpointError` naming `path` unless it is a whole safetensors file: a header that parses and a size
    that is exactly the header's data (a truncated copy or download fails here, not deep inside a load)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            length = int.from_bytes(handle.read(8), "little") if size >= 8 else None
            header = json.loads(handle.read(length)) if length is not None and 8 + length <= size else None
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing; copy or download the checkpoint again") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable safetensors header ({err}); copy or download it again") from None
    try:
        data = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (AttributeError, KeyError, IndexError, TypeError):
        data = None  # no header, or not the safetensors layout
    if data is None or size != 8 + length + data:
        expected = "" if data is None else f", its header describes {8 + length + data:,}"
        raise CheckpointError(f"{path}: {size:,} bytes{expected}: truncated or not a safetensors file; "
                              "copy or download it again")


def load_tokenizer(path: str | Path):
    """The checkpoint's tokenizer, with the chat template from wherever the checkpoint keeps it.

    AutoTokenizer (transformers 5) reads a template from chat_template.jinja or tokenizer_config.json
    only; the real Qwen3-Omni ships it as chat_template.json, which only its processor reads. Without
    this every prompt of every stage would fail on the real checkpoint.
    """
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    legacy = Path(path) / "chat_template.json"
    if not tokenizer.chat_template and legacy.is_file():
        try:
            tokenizer.chat_template = json.loads(legacy.read_text())["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{legacy}: chat_template: expected a JSON object with a string 'chat_template' ({err!r})") from None
    if not tokenizer.chat_template:
        raise FileNotFoundError(
            f"{path}: no chat template: looked for {', '.join(CHAT_TEMPLATE_FILES)} (key 'chat_template')"
        )
    return tokenizer


def composite_config(config: dict) -> dict:
    """A checkpoint's config.json as the real checkpoint's composite config (a thinker-only one is wrapped).

    vLLM registers only Qwen3OmniMoeForConditionalGeneration and reads `thinker_config`; the Thinking
    model has no talker, so audio output stays off.
    """
    if config.get("model_type") == "qwen3_omni_moe":
        return config
    if config.get("model_type") != "qwen3_omni_moe_thinker":
        raise ValueError(f"config.json: model_type: expected qwen3_omni_moe(_thinker), got {config.get('model_type')!r}")
    return {
        "architectures": ["Qwen3OmniMoeForConditionalGeneration"], "model_type": "qwen3_omni_moe",
        "enable_audio_output": False, "thinker_config": {**config, "architectures": None},
    }


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors weight files of a checkpoint folder (and their index)."""
    folder = Path(folder)
    return sorted(p for p in folder.iterdir() if p.suffix == ".safetensors" or p.name == WEIGHT_INDEX)


def save_thinker(thinker, out: str | Path, config: dict, max_shard_size: int | str = "5GB") -> Path:
    """Write `thinker` in the real checkpoint's layout: `config` (composite) as config.json, tensors named
    `thinker.*` in the checkpoint's own format (per-expert weights), `model-0000N-of-0000M.safetensors`
    shards of at most `max_shard_size` and their index. Earlier weight files in `out` are removed first.
    """
    from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import Qwen3OmniMoeConfig

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stale in weight_files(out):
        stale.unlink()
    config = composite_config(config)
    # The composite model is built on the meta device (no memory) and only carries the real thinker,
    # so save_pretrained's own naming and format conversion apply, as they did to the released files.
    with torch.device("meta"):
        wrapper = modeling_module().Qwen3OmniMoeForConditionalGeneration(Qwen3OmniMoeConfig(**config))
    wrapper.thinker = thinker
    wrapper.save_pretrained(out, max_shard_size=max_shard_size)
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    # save_pretrained writes the thinker's generation defaults; the caller supplies the checkpoint's own
    (out / "generation_config.json").unlink(missing_ok=True)
    if not (out / WEIGHT_INDEX).is_file():  # a single shard: name it like the real layout, with an index
        single = out / "model.safetensors"
        shard = out / "model-00001-of-00001.safetensors"
        single.rename(shard)
        from safetensors import safe_open

        with safe_open(str(shard), "pt") as f:
            names = list(f.keys())
        index = {"metadata": {"total_size": shard.stat().st_size}, "weight_map": {n: shard.name for n in names}}
        (out / WEIGHT_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return out


def checkpoint_tensors(name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """One thinker parameter as transformers names and holds it (`model.layers.0.mlp.experts.gate_up_proj`) in the
    released checkpoint's names and format (`thinker.`-prefixed; experts one tensor per expert and projection),
    which is what vLLM's loader reads (`VLLMEngine.load_weights`). The fused experts: gate_up_proj [E, 2m, h] is
    each expert's gate_proj.weight [m, h] then its up_proj.weight; down_proj [E, h, m] its down_proj.weight."""
    prefix = f"thinker.{name}"
    module, _, leaf = prefix.rpartition(".")
    if not module.endswith(".mlp.experts") or leaf not in ("gate_up_proj", "down_proj"):
        return [(prefix, tensor)]
    if leaf == "down_proj":
        return [(f"{module}.{e}.down_proj.weight", tensor[e]) for e in range(tensor.shape[0])]
    half = tensor.shape[1] // 2
    return [(f"{module}.{e}.{proj}.weight", part) for e in range(tensor.shape[0])
            for proj, part in (("gate_proj", tensor[e, :half]), ("up_proj", tensor[e, half:]))]


def copy_checkpoint_files(base: str | Path, out: str | Path) -> list[str]:
    """Copy every file of `base` that is not weights or config.json (tokenizer, chat template, processor
    and generation files) into `out`, byte for byte, so `out` keeps e.g. processor_class. Returns the names."""
    skip = {"config.json"} | {p.name for p in weight_files(base)}
    copied = []
    for path in sorted(Path(base).iterdir()):
        if path.is_file() and path.name not in skip and not path.name.startswith("."):
            shutil.copy2(path, Path(out) / path.name)
            copied.append(path.name)
    return copied
