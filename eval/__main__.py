"""Command line: `python -m eval {score,compare,side-by-side,convert,browse} ...`.

    python -m eval score RECIPE.yaml [eval.submission=... eval.judge.backend=openai ...]
    python -m eval compare A B --meta META.jsonl [--out compare.json]
    python -m eval side-by-side BASE TUNED --meta META.jsonl [--train-submission S --train-meta M] [--out F]
    python -m eval convert OLD.json NEW.jsonl
    python -m eval suite RECIPE.yaml [dotted.key=value ...] [--score-only]
    python -m eval suite-compare RUN_A RUN_B [--out compare.json]
    python -m eval reliance NORMAL_SUB ABLATED_SUB --meta META.jsonl [--out reliance.json] [--items per_item.jsonl]
    python -m eval browse RUN [RUN2] --out report.html [--silent SUB [SUB2]] [--names A B]
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
    p.add_argument("--base-silent", help="the base model's answers with silent audio (infer.audio_ablation=silence)")
    p.add_argument("--tuned-silent", help="the fine-tuned model's answers with silent audio")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the table and the comparison as JSON here")
    args = p.parse_args(argv)
    result = side_by_side(args.base, args.tuned, args.meta, args.train_submission, args.train_meta, args.seed,
                          args.base_silent, args.tuned_silent)
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


def _suite(argv: list[str]) -> int:
    from core.recipe import RecipeError, recipe_cli
    from eval.suite import run_suite

    score_only = "--score-only" in argv
    try:
        recipe = recipe_cli([a for a in argv if a != "--score-only"], "python -m eval suite",
                            "Answers (python -m infer run, resuming) and scores every benchmark of the recipe's suite "
                            "section; --score-only scores the answers already there.")
    except RecipeError as err:
        print(err, file=sys.stderr)
        return 2
    try:
        suite = run_suite(recipe, answer=not score_only)
    except RuntimeError as err:  # an `infer run` failed; its finished answers are kept
        print(f"error: {err}", file=sys.stderr)
        return 1
    print((Path(recipe.suite.out_dir) / "suite.md").read_text(encoding="utf-8"))
    return 0 if suite["benchmarks"] else 2


def _suite_compare(argv: list[str]) -> int:
    from eval.suite import compare_markdown, compare_suites

    p = argparse.ArgumentParser(prog="python -m eval suite-compare", description="Paired comparison of two suite runs.")
    p.add_argument("a", help="a suite run: its suite.json or its folder")
    p.add_argument("b")
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the comparison as JSON here")
    args = p.parse_args(argv)
    result = compare_suites(args.a, args.b, args.resamples, args.seed)
    print(compare_markdown(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def _reliance(argv: list[str]) -> int:
    from eval.reliance import item_labels, label_counts, markdown, reliance, write_items, write_json

    p = argparse.ArgumentParser(prog="python -m eval reliance",
                                description="Accuracy with and without the audio (infer.audio_ablation), answers changed, "
                                            "and a flag when accuracy hardly drops.")
    p.add_argument("normal", help="submission answered with the audio")
    p.add_argument("ablated", help="the same items answered with infer.audio_ablation=silence (or swap)")
    p.add_argument("--meta", required=True, help="the benchmark both answered")
    p.add_argument("--out", help="also write the figures as JSON here")
    p.add_argument("--items", help="also write per item both results and a label (weak-audio: right without the audio) "
                                   "as JSONL here: the audio-reliance curation (docs/rest.md)")
    args = p.parse_args(argv)
    result = reliance(args.normal, args.ablated, args.meta)
    print(markdown(result))
    if args.out:
        write_json(result, args.out)
    if args.items:
        rows = item_labels(args.normal, args.ablated, args.meta)
        write_items(rows, args.items)
        print(f"per item: {label_counts(rows)} -> {args.items}")
    return 0



def _browse(argv: list[str]) -> int:
    from eval.browse import browse

    p = argparse.ArgumentParser(prog="python -m eval browse",
                                description="One or two scored runs as one self-contained HTML page (works offline from disk).")
    p.add_argument("runs", nargs="+", metavar="RUN", help="what `eval score` wrote: its report folder or report.json (two: side by side)")
    p.add_argument("--out", required=True, help="the HTML file to write; clip links are relative to its folder")
    p.add_argument("--silent", nargs="+", default=[], metavar="SUB",
                   help="per run, in order (- for none): the same model's submission with silent audio (audio reliance)")
    p.add_argument("--names", nargs="+", help="a short name per run (default: the report folders)")
    p.add_argument("--audio-root", help="the folder the benchmark's audio_path entries are relative to (default: its folder)")
    args = p.parse_args(argv)
    out = browse(args.runs, args.out, args.silent, args.names, args.audio_root)
    print(f"results browser: {out} ({out.stat().st_size / 1e6:.2f} MB; open it in a browser)")
    return 0



COMMANDS = {"score": _score, "compare": _compare, "side-by-side": _side_by_side, "convert": _convert,
            "browse": _browse, "suite": _suite, "suite-compare": _suite_compare, "reliance": _reliance}


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
