"""Command line: `python -m eval {score,compare,convert} ...`.

    python -m eval score RECIPE.yaml [eval.submission=... eval.judge.backend=openai ...]
    python -m eval compare A B --meta META.jsonl [--out compare.json]
    python -m eval side-by-side BASE TUNED --meta META.jsonl [--train-submission S --train-meta M] [--out F]
    python -m eval convert OLD.json NEW.jsonl
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from eval.cache import JudgeCacheError
from eval.submission import SubmissionError


def _score(argv: list[str]) -> int:
    from core.recipe import RecipeError, recipe_cli
    from eval.judge import FatalJudgeError
    from eval.score import score

    try:
        recipe = recipe_cli(argv, "python -m eval score", "Scores eval.submission against eval.meta under the "
                            "challenge protocol; exit 3 when items are NOT EVALUATED (re-run to fill them).")
    except RecipeError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        report = score(recipe)  # a bar on a terminal, progress lines in a log
    except FatalJudgeError as err:
        print(f"judge error: {err}\nFinished ratings are in the cache; re-run to resume.", file=sys.stderr)
        return 1
    print(headline(report, Path(recipe.eval.report_dir) / "report.md"))
    return 0 if not report["not_evaluated"] else 3


def headline(report: dict, report_file: Path) -> str:
    """The printed result: the official figures first, the all-items figures beside them, both labelled."""
    def figures(t: dict) -> str:
        rub = "not computed" if t["rubrics"] is None else f"{t['rubrics']:.2f}"
        crs = "–" if t["crs"] is None else f"{t['crs']:.3f}"
        acc = "–" if t["accuracy"] is None else f"{t['accuracy']:.2f}"
        return f"Accuracy {acc}  Rubrics {rub}  CRS {crs}  over {t['n']} items"

    official, every = report["official"], report["totals"]
    return (f"official (submitted items): {figures(official)}\n"
            f"all items ({len(report['missing_ids'])} missing count wrong): {figures(every)}  "
            f"({every['not_evaluated']} NOT EVALUATED)  -> {report_file}")


def _compare(argv: list[str]) -> int:
    from eval.compare import compare, markdown

    p = argparse.ArgumentParser(prog="python -m eval compare", description="Paired comparison of two runs.")
    p.add_argument("a", help="submission JSONL/JSON, or report.json / report folder")
    p.add_argument("b")
    p.add_argument("--meta", help="benchmark meta JSONL (needed for submissions)")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the comparison as JSON here")
    args = p.parse_args(argv)
    result = compare(args.a, args.b, args.meta, args.resamples, args.seed)
    print(markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _side_by_side(argv: list[str]) -> int:
    from eval.side_by_side import markdown, side_by_side, write_json

    p = argparse.ArgumentParser(prog="python -m eval side-by-side",
                                description="Base vs fine-tuned per task type: format rate, accuracy, paired test.")
    p.add_argument("base", help="the base model's submission (its .raw.jsonl beside it)")
    p.add_argument("tuned", help="the fine-tuned model's submission (its .raw.jsonl beside it)")
    p.add_argument("--meta", required=True, help="the held-out benchmark both answered")
    p.add_argument("--train-submission", help="the fine-tuned model's answers to training records")
    p.add_argument("--train-meta", help="the training records it answered")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table and the comparison as JSON here")
    args = p.parse_args(argv)
    result = side_by_side(args.base, args.tuned, args.meta, args.train_submission, args.train_meta, args.seed)
    print(markdown(result))
    if args.out:
        write_json(result, args.out)
    return 0


def _convert(argv: list[str]) -> int:
    from eval.submission import convert_json_list

    p = argparse.ArgumentParser(prog="python -m eval convert",
                                description='Older [{"id","thinking","answer"}] JSON list -> submission JSONL.')
    p.add_argument("src")
    p.add_argument("dst")
    args = p.parse_args(argv)
    print(f"wrote {convert_json_list(args.src, args.dst)} records to {args.dst}")
    return 0


COMMANDS = {"score": _score, "compare": _compare, "side-by-side": _side_by_side, "convert": _convert}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        wants_help = bool(argv) and argv[0] in ("-h", "--help")
        print(__doc__.strip(), file=sys.stdout if wants_help else sys.stderr)
        return 0 if wants_help else 2
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[argv[0]](argv[1:])
    except (SubmissionError, JudgeCacheError) as err:
        print(f"input error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
