"""Loading the thinker under DeepSpeed ZeRO-3: each rank builds only its partition of every parameter and
fills it straight from the memory-mapped checkpoint. It lives in train/ because only training runs under
DeepSpeed: core, the runtime every stage shares, imports no DeepSpeed; every other load is `qo.load_thinker`."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import torch

from core import qwen_omni as qo

# A per-expert checkpoint tensor; transformers 5.19 fuses them per layer (conversion_mapping.py, "qwen2_moe",
# which qwen3_omni_moe(_thinker) uses): gate_up_proj = cat([stack(gate_e), stack(up_e)], dim=1), i.e.
# [experts, 2 x intermediate, hidden] with expert e's gate rows first, and down_proj = stack(down_e).
EXPERT_TENSOR = re.compile(r"(?P<experts>.+\.experts)\.(?P<expert>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\.weight")


def checkpoint_tensors(folder: str | Path) -> dict[str, tuple[Path, tuple]]:
    """Tensor name -> (weight file, shape) of a local safetensors checkpoint, from the files' headers only."""
    from safetensors import safe_open

    tensors = {}
    for path in qo.shard_files(folder):
        qo.check_weight_file(path)
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
    composite = any(name.startswith(qo.THINKER_PREFIX) for name in tensor_shapes)
    plan: dict[str, list[tuple[str, tuple]]] = {}
    slots: dict[str, set] = {}  # parameter -> what is filled: None (whole) or (expert, projection)
    errors = []
    for key, shape in sorted(tensor_shapes.items()):
        if composite and not key.startswith(qo.THINKER_PREFIX):
            continue
        name = key[len(qo.THINKER_PREFIX):] if composite else key
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


def load_thinker_zero3(path: str | Path, dtype: str = "auto", attn_implementation: str | None = None,
                       experts_implementation: str | None = None, allow_hub: bool = False):
    """`qo.load_thinker` (the same arguments but `device`) for training under DeepSpeed ZeRO-3, each rank
    reading only its own shard. It needs the DeepSpeed config registered (`HfDeepSpeedConfig`, which an
    Accelerator launched with a ZeRO-3 config does), so that is checked first: otherwise every rank would
    materialise the whole model in host memory.

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
    from transformers.integrations import is_deepspeed_zero3_enabled
    from transformers.monkey_patching import patch_output_recorders
    from transformers.utils.generic import ContextManagers

    if not is_deepspeed_zero3_enabled():
        raise RuntimeError("load_thinker_zero3: transformers does not see a ZeRO-3 DeepSpeed config; create the "
                           "Accelerator (launched with a ZeRO-3 accelerate config) before loading the model")
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    source = qo.checkpoint_source(path, allow_hub)
    if not Path(source).is_dir():
        raise ValueError(f"{source}: load_thinker_zero3 streams the weights from a local checkpoint folder; "
                         "download it first")
    cls = qo.thinker_class()
    config = cls.config_class.from_pretrained(source)
    config.name_or_path = str(source)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    if experts_implementation:
        config._experts_implementation = experts_implementation
    with ContextManagers(cls.get_init_context(config.dtype if dtype == "auto" else torch_dtype, False, False, None)):
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
            files = {shard: safe_open(str(shard), "pt") for shard in {tensors[k][0] for n, _ in own for k, _ in plan[n]}}
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
        raise ValueError("load_thinker_zero3 fills the partitions in memory: offload_param to nvme is not supported")
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
