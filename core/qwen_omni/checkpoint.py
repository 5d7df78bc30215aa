"""Checkpoint files: the released checkpoint's layout, loading the thinker and its tokenizer, and saving
in that layout (composite config, `thinker.*` shards and their index)."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path
from typing import Sequence

import torch

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


class CheckpointNotFound(FileNotFoundError):
    """A checkpoint path that is no local folder (and the hub is not allowed)."""


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
    zero3: bool = False,
):
    """The thinker alone, from a thinker checkpoint or a full Qwen3-Omni checkpoint (talker skipped).

    `experts_implementation`: how the fused MoE experts run ("grouped_mm", "batched_mm" or the
    per-expert "eager" loop); None keeps transformers' default (grouped_mm where it can dispatch).
    `zero3`: the caller trains under DeepSpeed ZeRO-3: `load_thinker_zero3` streams the weights in, so
    no rank holds more than its shard and one module. It needs the DeepSpeed config registered
    (`HfDeepSpeedConfig`, which an Accelerator launched with a ZeRO-3 config does), so that is checked
    here: otherwise every rank would materialise the whole model in host memory.
    """
    if zero3:
        from transformers.integrations import is_deepspeed_zero3_enabled

        if not is_deepspeed_zero3_enabled():
            raise RuntimeError("load_thinker(zero3=True): transformers does not see a ZeRO-3 DeepSpeed config; create the "
                               "Accelerator (launched with a ZeRO-3 accelerate config) before loading the model")
        if device:
            raise ValueError("load_thinker(zero3=True) places the shards itself; do not pass a device")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    if zero3:
        return load_thinker_zero3(checkpoint_source(path, allow_hub), torch_dtype, attn_implementation, experts_implementation)
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if experts_implementation:
        kwargs["experts_implementation"] = experts_implementation
    model = thinker_class().from_pretrained(checkpoint_source(path, allow_hub), **kwargs)
    if device:
        model = model.to(device)
    return model


# A per-expert checkpoint tensor; transformers 5.19 fuses them per layer (conversion_mapping.py, "qwen2_moe",
# which qwen3_omni_moe(_thinker) uses): gate_up_proj = cat([stack(gate_e), stack(up_e)], dim=1), i.e.
# [experts, 2 x intermediate, hidden] with expert e's gate rows first, and down_proj = stack(down_e).
EXPERT_TENSOR = re.compile(r"(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")


def checkpoint_tensors(folder: str | Path) -> dict[str, tuple[Path, tuple]]:
    """Tensor name -> (weight file, shape) of a local safetensors checkpoint, from the files' headers only."""
    from safetensors import safe_open

    folder = Path(folder)
    index = folder / WEIGHT_INDEX
    files = sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.is_file() \
        else [folder / "model.safetensors"]
    tensors = {}
    for path in files:
        with safe_open(str(path), "pt") as f:
            tensors |= {name: (path, tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    return tensors


def thinker_weight_plan(tensor_shapes: dict[str, tuple], param_shapes: dict[str, tuple],
                        tied: Sequence[str] = ()) -> dict[str, list[tuple[str, tuple]]]:
    """Where each checkpoint tensor goes: parameter name -> [(checkpoint name, index into the parameter)].

    `tensor_shapes`: the checkpoint's tensors (a composite checkpoint's `thinker.*` ones are the thinker's;
    its other sub-models' are skipped, as transformers skips them); `param_shapes`: the thinker's
    parameters, full shapes; `tied`: parameters that take their value by tying (no tensor needed).
    Per-expert tensors fill their slot of the fused expert parameter (EXPERT_TENSOR); an already fused
    tensor fills it whole. A tensor that fits no parameter, a parameter (or an expert's slot) that no
    tensor fills or two fill, or a shape mismatch raises ValueError naming them.
    """
    composite = any(name.startswith(THINKER_PREFIX) for name in tensor_shapes)
    plan: dict[str, list[tuple[str, tuple]]] = {}
    slots: dict[str, set] = {}  # parameter -> what is filled: None (whole) or (expert, projection)
    errors = []
    for key, shape in sorted(tensor_shapes.items()):
        if composite and not key.startswith(THINKER_PREFIX):
            continue
        name = key[len(THINKER_PREFIX):] if composite else key
        expert = EXPERT_TENSOR.fullmatch(name)
        target = f"{expert['experts']}.{'down_proj' if expert['proj'] == 'down_proj' else 'gate_up_proj'}" if expert else name
        if target not in param_shapes:
            errors.append(f"checkpoint tensor {key} fits no parameter of the thinker")
            continue
        full = param_shapes[target]
        if expert:
            e, half = int(expert["expert"]), full[1] // 2
            rows = {"gate_proj": slice(0, half), "up_proj": slice(half, full[1]), "down_proj": slice(None)}[expert["proj"]]
            index, slot = (e, rows), (e, expert["proj"])
            if e >= full[0]:
                errors.append(f"checkpoint tensor {key}: {target} has {full[0]} experts")
                continue
        else:
            index, slot = (), None
        expected = tuple(torch.empty(full, device="meta")[index].shape)
        if tuple(shape) != expected:
            errors.append(f"checkpoint tensor {key} has shape {tuple(shape)}, {target}{_index_text(index)} {expected}")
            continue
        filled = slots.setdefault(target, set())
        if slot in filled or (filled and (slot is None or None in filled)):
            errors.append(f"{target}: filled twice (again by {key})")
            continue
        filled.add(slot)
        plan.setdefault(target, []).append((key, index))
    for target, full in param_shapes.items():
        filled = slots.get(target, set())
        if target in tied or None in filled:
            continue
        if filled or target.endswith((".experts.gate_up_proj", ".experts.down_proj")):
            projs = ("down_proj",) if target.endswith("down_proj") else ("gate_proj", "up_proj")
            lacking = [f"{e}.{p}" for e in range(full[0]) for p in projs if (e, p) not in filled]
            if lacking:
                errors.append(f"{target}: no checkpoint tensor for expert {', '.join(lacking[:4])}"
                              + (f" and {len(lacking) - 4} more" if len(lacking) > 4 else ""))
        else:
            errors.append(f"parameter {target}: no checkpoint tensor")
    if errors:
        raise ValueError("checkpoint does not match the thinker: " + "; ".join(errors))
    return plan


def _index_text(index: tuple) -> str:
    parts = [f"{i.start or ''}:{'' if i.stop is None else i.stop}" if isinstance(i, slice) else str(i) for i in index]
    return f"[{', '.join(parts)}]" if parts else ""


def load_thinker_zero3(source: str | Path, dtype="auto", attn_implementation: str | None = None,
                       experts_implementation: str | None = None):
    """The thinker under DeepSpeed ZeRO-3, each rank reading only its own shard (`load_thinker(zero3=True)`).

    transformers' own ZeRO-3 load (5.19) reads every shard's full state dict on every rank and fuses the
    experts there; here the model is built as transformers builds it under ZeRO-3 (`get_init_context`:
    `deepspeed.zero.Init`, each rank allocating only its partition, parameters in DeepSpeed's dtype),
    then every rank fills its own partition of each parameter straight from the memory-mapped checkpoint
    (`safe_open(...).get_slice`): the rows of each tensor that overlap its flat range
    (`zero_partition_range`), per-expert tensors at their slot of the fused expert parameters
    (`thinker_weight_plan`). No parameter is gathered and no rank holds more than its partition plus
    one tensor's overlapping rows. Buffers (rotary frequencies, audio positions), ties and eval mode are
    then set as `from_pretrained` sets them.
    """
    import torch.distributed as dist
    from safetensors import safe_open
    from transformers import GenerationConfig
    from transformers.monkey_patching import patch_output_recorders
    from transformers.utils.generic import ContextManagers

    if not Path(source).is_dir():
        raise ValueError(f"{source}: load_thinker(zero3=True) streams the weights from a local checkpoint folder; "
                         "download it first")
    cls = thinker_class()
    config = cls.config_class.from_pretrained(source)
    config.name_or_path = str(source)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    if experts_implementation:
        config._experts_implementation = experts_implementation
    with ContextManagers(cls.get_init_context(config.dtype if dtype == "auto" else dtype, False, False, None)):
        model = cls(config)
    patch_output_recorders(model)
    # zero.Init makes every floating tensor created in __init__ its training dtype, buffers too: the rotary
    # frequencies came out bf16 (the tiny thinker's logits then differ by up to 1.8). The thinker's buffers
    # (rotary frequencies, audio positions) are float32 in a plain load whatever the dtype; their values
    # are recomputed by initialize_weights below.
    for buffer in model.buffers():
        buffer.data = buffer.data.float()
    built = next(model.parameters()).dtype  # DeepSpeed's (bf16 when the Accelerator runs bf16), whatever was asked
    for sub in [config, *(getattr(config, key) for key in config.sub_configs)]:
        sub.dtype = built

    params = dict(model.named_parameters())
    loaded = {n for n in params if n not in model.all_tied_weights_keys}
    failure = None
    try:  # any failure must reach every rank, or the others would wait forever in training's first collective
        tensors = checkpoint_tensors(source)
        plan = thinker_weight_plan({name: shape for name, (_, shape) in tensors.items()},
                                   {n: tuple(p.ds_shape) for n, p in params.items()}, model.all_tied_weights_keys)
        for module_name, module in model.named_modules():
            own = [(n, p) for n, p in module.named_parameters(module_name, recurse=False) if n in loaded]
            # opened per module: the pages mapped are unmapped with it, so no rank's RSS keeps the checkpoint
            files = {path: safe_open(str(path), "pt") for path in {tensors[k][0] for n, _ in own for k, _ in plan[n]}}
            for name, param in own:
                fill_zero3_partition(param, [(files[tensors[key][0]].get_slice(key), index) for key, index in plan[name]])
                param._is_hf_initialized = True  # loaded: initialize_weights must leave it alone
            del files
    except Exception as err:
        err.add_note(f"loading {source} under ZeRO-3 on rank {dist.get_rank()}")
        failure = err
    failures = [None] * dist.get_world_size()
    dist.all_gather_object(failures, None if failure is None else repr(failure))
    if failure is not None:
        raise failure
    for rank, text in enumerate(failures):
        if text is not None:
            raise RuntimeError(f"loading {source} under ZeRO-3 failed on rank {rank}: {text}")
    # what from_pretrained does after loading: buffers recomputed (every parameter is flagged), ties, eval
    model.initialize_weights()
    model.tie_weights()
    model.eval()
    if (Path(source) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    return model


def zero_partition_range(param) -> tuple[int, int]:
    """[start, end) of the flattened parameter that this rank's ZeRO-3 partition holds (`param.ds_tensor`).

    DeepSpeed's layout (partition_parameters.py, `_partition_param`): the flattened parameter, zero-padded
    to a multiple of the partition group's size, cut into equal consecutive pieces, piece k on rank k
    of the parameter's group (`ds_process_group`).
    """
    import torch.distributed as dist

    size = param.ds_tensor.ds_numel
    start = size * dist.get_rank(group=param.ds_process_group)
    return start, start + size


def fill_zero3_partition(param, sources: list[tuple[object, tuple]]) -> None:
    """Copy into this rank's partition of `param` the part of each (safetensors slice, index into the
    parameter) that falls in it, reading only the source rows that overlap it; padding is zeroed."""
    from deepspeed.runtime.zero.offload_config import OffloadDeviceEnum

    if getattr(param.ds_tensor, "final_location", None) == OffloadDeviceEnum.nvme:
        raise ValueError("load_thinker(zero3=True) fills the partitions in memory: offload_param to nvme is not supported")
    start, end = zero_partition_range(param)
    partition = param.ds_tensor.data
    with torch.no_grad():
        if end > param.ds_numel:  # the last partition's padding
            partition[max(param.ds_numel - start, 0):].zero_()
        for source, index in sources:
            region = torch.empty(param.ds_shape, device="meta")[index]
            if not region.is_contiguous():
                raise ValueError(f"{_index_text(index)}: not a contiguous block of the parameter")
            offset = region.storage_offset()  # where the tensor starts in the flattened parameter
            low, high = max(offset, start), min(offset + region.numel(), end, param.ds_numel)
            if low >= high:
                continue
            shape = source.get_shape()
            row = math.prod(shape[1:]) if len(shape) > 1 else 1
            first, last = (low - offset) // row, -(-(high - offset) // row)  # the rows that overlap [low, high)
            rows = source[first:last]
            flat = rows.reshape(-1)[low - offset - first * row: high - offset - first * row]
            partition[low - start: high - start].copy_(flat)


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
