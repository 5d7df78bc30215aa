"""GRPO's audio-reliance probe: does the policy still listen?

Late in RL a policy can drift to answering from the text alone (modality collapse, MAPO). Every
`grpo.reliance_every` steps the probe answers the first `grpo.reliance_items` items of `infer.meta`
(the held-out set, never a training stage's) greedily twice through the rollout engine: with each
clip, and with silence of the same length (infer/ablation.py, as `infer.audio_ablation=silence`).
metrics.jsonl gets `reliance/accuracy`, `reliance/accuracy_silent`, `reliance/chance`,
`reliance/changed` (% of answers that change) and `reliance/hardly_drops` (1 when accuracy drops by
under a third of its gap above chance: eval/reliance.py's flag). Every rank answers the same items:
the generation runs on each rank's full copy of the policy, with no collective call to skip.
"""

from __future__ import annotations

from dataclasses import dataclass

from core import qwen_omni as qo
from core.items import Item, load_items
from core.recipe import Recipe
from eval.reliance import reliance_figures
from infer.ablation import request_audio
from infer.engine import HFEngine, Request, SamplingConfig
from infer.parse import parse_output


@dataclass
class RelianceProbe:
    items: list[Item]
    every: int
    recipe: Recipe

    @classmethod
    def for_recipe(cls, recipe: Recipe) -> "RelianceProbe | None":
        grpo = recipe.grpo
        if grpo.reliance_every is None:
            return None
        items = load_items(recipe.infer.meta, recipe.infer.audio_root)[: grpo.reliance_items]
        return cls(items, grpo.reliance_every, recipe)

    def answers(self, engine: HFEngine, ablation: str) -> dict[str, str]:
        recipe = self.recipe
        greedy = SamplingConfig(max_new_tokens=recipe.grpo.max_new_tokens, do_sample=False)
        requests = [Request(it.id, qo.render_prompt(engine.tokenizer, it.question, it.choices, recipe.model.prompt_style),
                            request_audio(it, ablation, None, recipe.data.max_audio_seconds)) for it in self.items]
        by_id = {it.id: it for it in self.items}
        return {g.id: parse_output(g.text, by_id[g.id].choices).answer for g in engine.generate(requests, greedy)}

    def at(self, step: int, model, engine: HFEngine) -> dict:
        """The reliance/* metrics at `step` (1-based) when it is a probe step, else {}."""
        if step % self.every:
            return {}
        model.eval()
        try:
            normal, silent = self.answers(engine, "none"), self.answers(engine, "silence")
        finally:
            model.train()
        meta = [{"id": it.id, "choices": list(it.choices), "answer": it.answer} for it in self.items]
        r = reliance_figures(meta, normal, silent)
        return {"reliance/accuracy": r["accuracy"], "reliance/accuracy_silent": r["accuracy_ablated"],
                "reliance/chance": r["chance"], "reliance/changed": r["changed"],
                "reliance/hardly_drops": float(r["hardly_drops"])}
