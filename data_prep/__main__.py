"""The Cogito-Pipe command line.

    python -m data_prep collect RECIPE [--shard i/n] [dotted.key=value ...]
    python -m data_prep qa RECIPE [--shard i/n] [dotted.key=value ...]
    python -m data_prep cot RECIPE [--shard i/n] [dotted.key=value ...]
    python -m data_prep verify RECIPE [--shard i/n] [dotted.key=value ...]
    python -m data_prep guard FILE --meta MMAR-meta.jsonl [--audio-root DIR] [--out CLEAN.jsonl]
    python -m data_prep card RECIPE [--data TRAINING.jsonl] [--curation PER_ITEM.jsonl ...] [dotted.key=value ...]

Every recipe command writes the resolved recipe into the work dir (resolved_recipe.yaml).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from core.items import DataError
from core.recipe import Recipe, RecipeError, recipe_cli, save_recipe, split_cli

USAGE = __doc__.split("\n\n")[1]
REPORT_KEYS = ("stage", "in", "out", "rejected", "counts", "seconds", "complete")


def _pop_option(args: list[str], flag: str, example: str) -> str | None:
    """Remove `flag VALUE` from `args` and return VALUE (None when the flag is absent)."""
    if flag not in args:
        return None
    at = args.index(flag)
    if at + 1 >= len(args):
        raise RecipeError(f"{flag} needs a value like {example}")
    value = args[at + 1]
    del args[at : at + 2]
    return value


def _recipe(argv: list[str]) -> Recipe:
    """RECIPE [--shard i/n] [overrides]: --shard is the short form of data_prep.shard=i/n."""
    args = list(argv)
    shard = _pop_option(args, "--shard", "0/4")
    if shard is not None:
        args.append(f"data_prep.shard={shard}")
    if "-h" not in args and "--help" not in args and split_cli(args)[0] is None:
        raise RecipeError("expected a recipe: python -m data_prep COMMAND RECIPE.yaml [dotted.key=value ...]")
    recipe = recipe_cli(args, "python -m data_prep COMMAND [--shard i/n]", USAGE)
    save_recipe(recipe, Path(recipe.data_prep.work_dir) / "resolved_recipe.yaml")
    return recipe


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "collect":
            from data_prep.collect import collect

            recipe = _recipe(rest)
            report = collect(recipe.data_prep, max_seconds=recipe.data.max_audio_seconds)
            print(json.dumps({k: report[k] for k in REPORT_KEYS if k in report}))
            return 0
        if command in ("qa", "cot", "verify"):
            from data_prep import cot, qa, verify

            stage = {"qa": qa.qa, "cot": cot.cot, "verify": verify.verify}[command]
            report = stage(_recipe(rest))
            print(json.dumps({k: report[k] for k in REPORT_KEYS if k in report}))
            return 0
        if command == "card":
            from data_prep.card import write_card

            args = list(rest)
            data_file = _pop_option(args, "--data", "runs/x/sft.jsonl")  # default: the newest stage output
            curation = []  # per-item curation statistics (eval reliance --items, train.rest buckets), repeatable
            while (path := _pop_option(args, "--curation", "runs/x/audio_reliance.jsonl")) is not None:
                curation.append(path)
            recipe = _recipe(args)
            card = write_card(recipe.data_prep.work_dir, data_file, recipe.data_prep, curation)
            print(f"data card: {card['records']} records, {card['hours']:.2f} h -> {recipe.data_prep.work_dir}/data_card.md")
            return 0
        if command == "guard":
            from data_prep.guard import main as guard_main

            return guard_main(rest)
    except (RecipeError, DataError, FileNotFoundError) as err:  # missing checkpoints name their path
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"unknown command {command!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
