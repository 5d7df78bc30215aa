"""Score one submission under the challenge protocol and write the report.

    python -m eval score recipes/tiny.yaml eval.submission=runs/x/submission.jsonl eval.judge.backend=openai
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from core.answer_rule import is_correct
from core.recipe import save_recipe
from eval.cache import JudgeCache
from eval.judge import Backoff, JudgeJob, RateLimiter, make_backend, run_judge, sampling_settings
from eval.protocol import judge_user_prompt, trimmed_mean
from eval.report import ItemResult, confidence_intervals, cue_hits, summarize, tables, write
from eval.submission import SubmissionError, load_meta, load_submission, match

log = logging.getLogger(__name__)

OFFICIAL_LABEL = ("official: the submitted benchmark items, as the challenge's scripts count them "
                  "(ids the submission lacks are not in the denominator)")
ALL_ITEMS_LABEL = "all benchmark items: ids the submission lacks count as wrong"


def score(recipe, progress: bool = True, backend=None) -> dict:
    """Score `recipe.eval.submission` against `recipe.eval.meta`; returns the report (also written).

    `backend` overrides the one the recipe names (tests pass fakes).
    """
    cfg, jcfg = recipe.eval, recipe.eval.judge
    started = time.perf_counter()
    out_dir = Path(cfg.report_dir)
    meta = load_meta(cfg.meta)
    sub = match(load_submission(cfg.submission), meta)
    recipe_file = save_recipe(recipe, out_dir / "recipe.yaml")
    judged = jcfg.backend != "none" or backend is not None

    correct: dict[str, bool] = {}
    jobs = []
    for rec in meta:
        pred = sub.predictions.get(rec["id"])
        correct[rec["id"]] = pred is not None and is_correct(pred.answer, rec["answer"], rec["choices"])
        if judged and correct[rec["id"]]:
            if not rec.get("rubric"):
                raise SubmissionError(f"{cfg.meta} (id={rec['id']}): rubric: missing; the judge needs it")
            user = judge_user_prompt(rec["question"], rec["answer"], rec.get("thinking") or "", rec["rubric"],
                                     pred.thinking, pred.answer)
            jobs.append(JudgeJob(rec["id"], user, rec["rubric"]))

    result = None
    if judged:
        result = _judge(jobs, jcfg, backend, progress)

    items = []
    for rec in meta:
        rid, pred = rec["id"], sub.predictions.get(rec["id"])
        found, total = cue_hits(rec.get("cue"), pred.thinking if pred else "")
        item = ItemResult(id=rid, modality=rec.get("modality"), category=rec.get("category"),
                          sub_category=rec.get("sub-category"), status="scored", correct=correct[rid], score=0.0,
                          ratings=[], cues_found=found, cues_total=total)
        if pred is None:
            item.status = "missing"
        elif not correct[rid]:
            item.status = "wrong"
        elif not judged:
            item.status, item.score = "not_judged", None
        elif rid in result.ratings:
            item.ratings = result.ratings[rid]
            item.score = trimmed_mean(item.ratings)
        else:
            item.status, item.score, item.reason = "not_evaluated", None, result.failures.get(rid, "no ratings")
        items.append(item)

    not_evaluated = [{"id": it.id, "reason": it.reason} for it in items if it.status == "not_evaluated"]
    report = {
        "submission": str(cfg.submission),
        "submission_format": sub.format,
        "submission_schema": sub.schema,
        "meta": str(cfg.meta),
        "items_total": len(items),
        "judged": judged,
        "judge_name": (backend.identity if backend is not None else f"{jcfg.backend}:{jcfg.model}") if judged
        else "none (Rubrics not computed)",
        # The headline: what the official scripts report, over the submitted items only.
        "official": {**summarize([it for it in items if it.status != "missing"], judged), "label": OFFICIAL_LABEL},
        "totals": {**summarize(items, judged), "label": ALL_ITEMS_LABEL},
        "confidence": confidence_intervals(items, judged, cfg.bootstrap, cfg.bootstrap_seed),
        "counting": _counting_note(len(items), len(sub.missing_ids), len(not_evaluated), judged),
        "tables": tables(items, judged),
        "not_evaluated": not_evaluated,
        "missing_ids": sub.missing_ids,
        "unknown_ids": sub.unknown_ids,
        "warnings": sub.warnings,
        "judge": vars(result.stats) if result else None,
        "recipe_file": str(recipe_file),
    }
    paths = write(report, out_dir, items, cfg.charts)
    report["seconds"] = time.perf_counter() - started
    log.info("scored %d items in %.2f s -> %s", len(items), report["seconds"], paths["markdown"])
    return report


def _judge(jobs, jcfg, backend, progress):
    backend = backend or make_backend(jcfg)
    cache = JudgeCache(jcfg.cache)
    try:
        return run_judge(jobs, backend, cache, jcfg.ratings, sampling_settings(jcfg), jcfg.max_attempts,
                         RateLimiter(jcfg.requests_per_minute), Backoff(jcfg.backoff_s, jcfg.backoff_max_s), progress)
    finally:
        cache.close()


def _counting_note(total: int, missing: int, not_evaluated: int, judged: bool) -> str:
    parts = [f"{total - not_evaluated} of {total} benchmark items counted"]
    if missing:
        parts.append(f"{missing} ids missing from the submission: the official figures leave them out (the "
                     f"challenge's scripts divide by the submitted items only), the all-items figures count them wrong")
    if not_evaluated:
        parts.append(f"{not_evaluated} NOT EVALUATED items (correct answers without a complete set of judge "
                     f"ratings) are left out of every denominator, as the official script leaves them out; "
                     f"they are listed below")
    if not judged:
        parts.append("Rubrics and CRS are not computed (judge backend `none`)")
    return "; ".join(parts) + "."
