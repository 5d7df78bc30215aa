"""Command line: `infer run RECIPE [dotted.key=value ...]` and `infer validate FILE --meta META`.

Also reachable as `python -m infer ...`.
"""

from __future__ import annotations

import argparse
import sys

from core.items import DataError
from core.recipe import RecipeError, recipe_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="infer", description="Batched reasoning + answer in the challenge submission format.")
    commands = parser.add_subparsers(dest="command", required=True)
    run_parser = commands.add_parser("run", help="answer the benchmark of a recipe (resumes an interrupted run)")
    run_parser.add_argument("args", nargs=argparse.REMAINDER, metavar="RECIPE [dotted.key=value ...]",
                            help="a recipe and dotted overrides; every key: python -m core.recipe show RECIPE")
    check = commands.add_parser("validate", help="check a submission JSONL against the benchmark metadata")
    check.add_argument("file")
    check.add_argument("--meta", required=True, help="benchmark metadata JSONL (MMAR schema)")
    check.add_argument("--allow-unmatched", action="store_true",
                       help="accept answers that are not one of the item's choices (warn instead)")
    args = parser.parse_args(argv)
    try:
        if args.command == "run":
            from infer.run import OutputBusy, run

            recipe = recipe_cli(args.args, "infer run", "Answers every item of infer.meta into infer.output; "
                                "re-running the same command resumes.")
            try:
                run(recipe)
            except OutputBusy as err:
                print(f"error: {err}", file=sys.stderr)
                return 2
            return 0
        from infer.submission import validate_submission

        errors, warnings = validate_submission(args.file, args.meta, args.allow_unmatched)
    except (RecipeError, DataError, FileNotFoundError, ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for line in warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in errors:
        print(line, file=sys.stderr)
    print(f"{args.file}: {'INVALID, ' + str(len(errors)) + ' problem(s)' if errors else 'valid'}")
    return 1 if errors else 0
