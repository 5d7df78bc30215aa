"""The adapter's gradients at every optimizer step of a train/sft.py run, read just before the optimizer uses them.

In-process (tests/test_train.py): `with captured_gradients() as steps: run_sft(...)`.
As a rank under Accelerate (the multi-rank tests), which writes OUT/grads-rank{R}.pt:

    accelerate launch --config_file recipes/accelerate/cpu_zero2_2proc.yaml tests/sft_grads.py OUT RECIPE [OVERRIDES...]

Equivalence tests compare these, not the trained weights: Adam's first steps move a weight by about lr
whatever its gradient's size, so summation-order noise in a near-zero gradient can flip a weight's step.
"""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root


@contextlib.contextmanager
def captured_gradients():
    """Yields a list that gets, per optimizer step, {adapter parameter name: its full fp32 gradient}.

    The model is found by spying on train.runtime.prepare_for_training, which every trainer's model goes through. Without DeepSpeed
    a global optimizer pre-step hook reads `.grad`; DeepSpeed steps inside `accelerator.backward` and frees
    the gradients of its partitions before its optimizer runs, so there the engine's step is wrapped and
    safe_get_full_grad assembles each gradient at the window's end (a collective: every rank takes part)."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_grad
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    from train import runtime

    models, steps, in_engine = [], [], []
    prepare, engine_step = runtime.prepare_for_training, DeepSpeedEngine.step

    def spy(*args, **kwargs):
        model, placed = prepare(*args, **kwargs)
        models.append(model)
        return model, placed

    def read():
        (model,) = models
        steps.append({name: safe_get_full_grad(p).detach().float().clone()
                      for name, p in model.named_parameters() if p.requires_grad})

    def before_optimizer_step(optimizer, args, kwargs):
        if not in_engine:
            read()

    def step_engine(engine, *args, **kwargs):
        if engine.is_gradient_accumulation_boundary():
            read()
        in_engine.append(True)
        try:
            return engine_step(engine, *args, **kwargs)
        finally:
            in_engine.pop()

    runtime.prepare_for_training, DeepSpeedEngine.step = spy, step_engine
    hook = register_optimizer_step_pre_hook(before_optimizer_step)
    try:
        yield steps
    finally:
        hook.remove()
        runtime.prepare_for_training, DeepSpeedEngine.step = prepare, engine_step


def main(out: str, *sft_args: str) -> int:
    import torch
    from accelerate import PartialState

    from train.sft import main as sft

    with captured_gradients() as steps:
        code = sft(list(sft_args))
    torch.save(steps, Path(out) / f"grads-rank{PartialState().process_index}.pt")
    return code


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
