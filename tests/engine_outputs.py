"""A recipe's engine on its benchmark items: per item the generated token ids, prompt length and text.

    python tests/engine_outputs.py OUT.json RECIPE [dotted.key=value ...]

tests/test_vllm.py calls `engine_outputs` in-process for the hf engine and runs this file for vLLM,
in its own process: vLLM starts an engine and a worker process that re-import the main module, hence
the `__main__` guard, and a crash or hang there cannot take pytest with it. The requests are the
ones `infer run` builds (`infer.run.item_request`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repo root


def engine_outputs(recipe, device: str | None = None) -> dict:
    from infer.engine import load_engine
    from infer.run import benchmark_items, item_request

    engine = load_engine(recipe, device)
    _, items = benchmark_items(recipe)
    requests = [item_request(i, engine.tokenizer, recipe.model.prompt_style, recipe.infer.max_audio_seconds)
                for i in items]
    return {
        "describe": engine.describe(),
        "generations": {g.id: {"token_ids": list(g.token_ids), "n_prompt_tokens": g.n_prompt_tokens,
                               "finished": g.finished, "text": g.text} for g in engine.generate(requests)},
    }


def main(argv: list[str]) -> int:
    from core.recipe import load_recipe, split_cli

    out, recipe_args = Path(argv[0]), argv[1:]
    out.write_text(json.dumps(engine_outputs(load_recipe(*split_cli(recipe_args))), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
