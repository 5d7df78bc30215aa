"""Inference-time scaling within Track 1's rules: greedy vs self-consistency at n chains, MATA off vs on.

    python -m bench.scaling_bench RECIPE [--n 4 8 16] [--mata-layers 1] [--mata-strength 2] [--limit N]
                                  [--out runs/bench/scaling] [--json F] [overrides ...]

Every variant answers the same items of the recipe's `infer.meta` with its model and adapter (resumable
`infer run` outputs under --out); each is compared with greedy item by item (`eval compare`: accuracy,
the paired difference with its 95% bootstrap interval, exact McNemar p) beside its cost in generated
tokens (every chain counted). Greedy and the self-consistency variants share one loaded engine; MATA
loads its own (the boost is installed at load).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.common import machine, print_table, write_json
from core.recipe import load_recipe
from eval.compare import compare
from infer.engine import load_engine
from infer.run import run


def variants(n_chains: list[int], mata_layers: list[int], mata_strength: float) -> dict[str, list[str]]:
    """name -> the overrides that make it (greedy first: the baseline of every comparison)."""
    found = {"greedy": ["infer.do_sample=false"]}
    for n in n_chains:
        found[f"self-consistency n={n}"] = ["infer.do_sample=false", f"infer.self_consistency.n={n}"]
    if mata_layers:
        found[f"MATA x{mata_strength:g} on layers {mata_layers}"] = [
            "infer.do_sample=false", f"infer.mata.layers={json.dumps(mata_layers)}", f"infer.mata.strength={mata_strength}"]
    return found


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*", help="dotted recipe overrides for every variant")
    parser.add_argument("--n", type=int, nargs="*", default=[4, 8, 16], help="self-consistency chain counts")
    parser.add_argument("--mata-layers", type=int, nargs="*", default=[], help="MATA layers; none: MATA not run")
    parser.add_argument("--mata-strength", type=float, default=2.0)
    parser.add_argument("--limit", type=int, default=None, help="first N items")
    parser.add_argument("--out", default="runs/bench/scaling")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    base = args.overrides + ([f"infer.limit={args.limit}"] if args.limit else [])
    out = Path(args.out)
    engine, rows, results = None, [], {}
    for name, overrides in variants(args.n, args.mata_layers, args.mata_strength).items():
        folder = out / name.split(" on ")[0].replace(" ", "_").replace("=", "")
        recipe = load_recipe(args.recipe, [*base, *overrides, f"infer.output={folder / 'submission.jsonl'}"])
        if recipe.infer.mata is None:
            engine = engine or load_engine(recipe)
        summary = run(recipe, engine if recipe.infer.mata is None else None)
        results[name] = {"submission": summary["output"], "generated_tokens": summary["totals"]["generated_tokens"],
                         "items": summary["totals"]["done"]}
    greedy = results["greedy"]
    # the answered items only (infer.limit): an item left out would count as wrong on both sides
    meta = load_recipe(args.recipe, base).infer.meta
    answered = out / "items.jsonl"
    records = [line for line in Path(meta).open(encoding="utf-8") if line.strip()]
    answered.write_text("".join(records[:args.limit]))
    for name, result in results.items():
        paired = compare(greedy["submission"], result["submission"], answered)
        result.update(accuracy=round(paired["accuracy_b"], 2), delta=round(paired["accuracy_delta"], 2),
                      delta_ci=[round(x, 2) for x in paired["accuracy_delta_ci"]], mcnemar_p=round(paired["mcnemar_p"], 4),
                      tokens_vs_greedy=round(result["generated_tokens"] / max(greedy["generated_tokens"], 1), 2))
        rows.append({"variant": name, "items": result["items"], "accuracy %": result["accuracy"],
                     "vs greedy": f"{result['delta']:+.2f} [{result['delta_ci'][0]:+.2f}, {result['delta_ci'][1]:+.2f}]",
                     "McNemar p": result["mcnemar_p"], "generated tokens": result["generated_tokens"],
                     "tokens / greedy": result["tokens_vs_greedy"]})
    report = {"recipe": args.recipe, "overrides": base, "machine": machine(), "variants": results}
    print_table(rows, f"Inference-time scaling on {recipe.infer.meta} ({args.recipe})")
    print(json.dumps(report["machine"]))
    write_json(args.json, report)
    return report


if __name__ == "__main__":
    main()
