"""A GRPO run with vLLM rollouts (train/grpo.py, grpo.rollout_engine=vllm) that checks every weight push:
after each push, vLLM's greedy tokens for a few test items against the hf engine on the policy being trained.

    python tests/grpo_vllm_run.py OUT_DIR RECIPE [dotted.key=value ...]
    accelerate launch --config_file recipes/accelerate/cpu_ddp_2proc.yaml tests/grpo_vllm_run.py OUT_DIR RECIPE ...

Writes OUT_DIR/pushes.rank{R}.json: per push the tensors pushed, both engines' greedy token ids per item and the
sum of the adapter's weights (the ranks' policies compared).
tests/test_vllm.py runs it in its own process (vLLM in the trainer's process; a crash cannot take pytest with
it). The rewards get a `length` stand-in that varies between the random tiny model's completions, as in
tests/test_grpo.py, so the advantages are not all zero and the policy moves between pushes.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root

CHECK_ITEMS = 6
CHECK_TOKENS = 12


def letter_share(rollouts) -> list[float]:
    return [sum(c.isalpha() for c in r.text) / max(len(r.text), 1) for r in rollouts]


def main(argv: list[str]) -> int:
    import torch

    import train.grpo
    from core import qwen_omni as qo
    from core.items import load_items
    from core.recipe import load_recipe, split_cli
    from infer.engine import HFEngine, Request, SamplingConfig
    from train.rollouts import placeholder_ids

    out, (recipe_path, overrides) = Path(argv[0]), split_cli(argv[1:])
    recipe = load_recipe(recipe_path, overrides)
    processor = qo.OmniProcessor.from_pretrained(recipe.model.path)
    items = load_items(recipe.grpo.stages[0].data[0].path)[:CHECK_ITEMS]
    requests = [Request(it.id, qo.render_prompt(processor.tokenizer, it.question, it.choices, recipe.model.prompt_style),
                        it.load_audio(recipe.data.max_audio_seconds)) for it in items]
    greedy = SamplingConfig.greedy(CHECK_TOKENS)
    pushes, rank = [], {"value": 0}
    push = train.grpo.push_policy

    def checked_push(engine, policy, dtype):
        pushed = push(engine, policy, dtype)
        was_training = policy.training
        base = policy.get_base_model()
        suppressed, base.generation_config.suppress_tokens = base.generation_config.suppress_tokens, placeholder_ids(processor)
        hf = HFEngine(policy, processor, greedy, len(requests), "cpu")  # puts the policy in eval mode
        with torch.no_grad():
            expected = {g.id: list(g.token_ids) for g in hf.generate(requests, greedy)}
        base.generation_config.suppress_tokens = suppressed
        policy.train(was_training)
        got = {g.id: list(g.token_ids) for g in engine.generate(requests, greedy)}
        adapter = float(sum(p.detach().double().sum() for p in policy.parameters() if p.requires_grad))
        pushes.append({"tensors": pushed[0], "seconds": pushed[1], "vllm": got, "hf": expected, "adapter_sum": adapter})
        return pushed

    train.grpo.push_policy = checked_push
    build = train.grpo.build_rewards
    train.grpo.build_rewards = lambda config, names, budget, device: {**build(config, names, budget, device), "length": letter_share}
    launch = train.grpo.runtime.launch

    @contextlib.contextmanager
    def launched(*args, **kwargs):
        with launch(*args, **kwargs) as (accelerator, log):
            rank["value"] = accelerator.process_index
            yield accelerator, log

    train.grpo.runtime.launch = launched
    code = train.grpo.main([recipe_path, *overrides])
    out.mkdir(parents=True, exist_ok=True)
    (out / f"pushes.rank{rank['value']}.json").write_text(json.dumps(pushes))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
