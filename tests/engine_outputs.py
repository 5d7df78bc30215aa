"""A recipe's engine on its benchmark items: per item the generated token ids, prompt length and text,
and with a thinking budget a second run of the same items under it, from the same engine.

    python tests/engine_outputs.py OUT.json [--thinking-budget N] [--copies K] RECIPE [dotted.key=value ...]

tests/test_vllm.py calls `engine_outputs` in-process for the hf engine and runs this file for vLLM,
in its own process: vLLM starts an engine and a worker process that re-import the main module, hence
the `__main__` guard, and a crash or hang there cannot take pytest with it. The requests are the
ones `infer run` builds (`infer.run.item_request`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root


def engine_outputs(recipe, device: str | None = None, thinking_budget: int | None = None, copies: int | None = None) -> dict:
    from infer.engine import load_engine
    from infer.run import benchmark_items, item_request

    engine = load_engine(recipe, device)
    _, items = benchmark_items(recipe)
    requests = [item_request(i, engine.tokenizer, recipe.model.prompt_style, recipe.infer.max_audio_seconds)
                for i in items]

    def generations(sampling) -> dict:
        return {g.id: {"token_ids": list(g.token_ids), "n_prompt_tokens": g.n_prompt_tokens, "finished": g.finished,
                       "text": g.text, "budget_fired": g.budget_fired} for g in engine.generate(requests, sampling)}

    outputs = {"describe": engine.describe(), "prompts": {r.id: r.prompt for r in requests},
               "generations": generations(engine.sampling)}
    if thinking_budget is not None:  # one process for both runs: a vLLM start costs ~30 s on a CPU
        outputs["budgeted"] = generations(engine.sampling.replace(thinking_budget=thinking_budget))
    if copies is not None:  # `copies` sampled completions of the first 4 items: as K requests each, and from one (n=K)
        sampled = engine.sampling.replace(do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=16,
                                          thinking_budget=None)
        repeated = [dataclasses.replace(r, id=f"{r.id}@{k}") for r in requests[:4] for k in range(copies)]
        outputs["copies"] = {g.id: list(g.token_ids) for g in engine.generate(repeated, sampled)}
        outputs["groups"] = {g.id: list(g.token_ids) for g in engine.generate_groups(requests[:4], copies, sampled)}
    return outputs


def main(argv: list[str]) -> int:
    from core.recipe import load_recipe, split_cli

    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--thinking-budget", type=int)
    parser.add_argument("--copies", type=int)
    parser.add_argument("recipe_args", nargs="+")
    args = parser.parse_args(argv)
    outputs = engine_outputs(load_recipe(*split_cli(args.recipe_args)), thinking_budget=args.thinking_budget,
                             copies=args.copies)
    args.out.write_text(json.dumps(outputs, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
