"""Put the table `make demo` printed into the README, between its marker comments.

    python -m tools.readme_demo_table [runs/tiny/side_by_side.json] [--readme README.md] [--print]

Reads the JSON `python -m eval side-by-side` wrote at the end of `make demo`, renders it with the
same function that printed it (`eval.side_by_side.markdown`), adds the date the JSON was written
and the machine (CPU model from /proc/cpuinfo, core count), and replaces what lies between
`<!-- demo-table:begin -->` and `<!-- demo-table:end -->` in the README; nothing else changes.
`make readme-demo` runs it after `make demo`.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
from pathlib import Path

from eval.side_by_side import markdown

BEGIN, END = "<!-- demo-table:begin -->", "<!-- demo-table:end -->"


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """'AMD EPYC 7B13, 2 cores' from /proc/cpuinfo; the platform's processor name elsewhere."""
    name = None
    if cpuinfo.is_file():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                name = value.strip()
                break
    return f"{name or platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def render(result: dict, date: str, machine: str) -> str:
    """The markdown block: the side-by-side table and paired line as `make demo` prints them, then where they came from."""
    return (f"{markdown(result)}\n\n"
            f"<sub>`make demo` on {date}, {machine}; written by `make readme-demo` from runs/tiny/side_by_side.json.</sub>")


def rewrite(text: str, block: str) -> str:
    """`text` with the part between the markers replaced by `block` (markers kept, everything else unchanged)."""
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise ValueError(f"expected one {BEGIN} followed by one {END}")
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("json", nargs="?", default="runs/tiny/side_by_side.json", type=Path)
    p.add_argument("--readme", default="README.md", type=Path)
    p.add_argument("--print", action="store_true", help="print the block instead of rewriting the README")
    args = p.parse_args(argv)
    if not args.json.is_file():
        print(f"{args.json}: file not found (run `make demo` first)", file=sys.stderr)
        return 1
    result = json.loads(args.json.read_text())
    date = dt.date.fromtimestamp(args.json.stat().st_mtime).isoformat()
    block = render(result, date, cpu_model())
    if args.print:
        print(block)
        return 0
    args.readme.write_text(rewrite(args.readme.read_text(), block))
    print(f"{args.readme}: demo table from {args.json} ({date})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
