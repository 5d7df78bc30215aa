"""tools/readme_demo_table.py: the README's demo table is rendered from `make demo`'s side_by_side.json."""

import json

import pytest

from tools.readme_demo_table import BEGIN, END, cpu_model, main, render, rewrite

RESULT = {  # the shape `python -m eval side-by-side --out` writes (eval/side_by_side.py)
    "rows": [
        {"task": "Counting", "base": {"n": 20, "format": 0.0, "accuracy": 90.0},
         "tuned": {"n": 20, "format": 90.0, "accuracy": 90.0}, "tuned_on_train": {"n": 20, "format": 95.0, "accuracy": 80.0}},
        {"task": "Temporal Order", "base": {"n": 20, "format": 0.0, "accuracy": 0.0},
         "tuned": {"n": 20, "format": 100.0, "accuracy": 100.0}, "tuned_on_train": None},
        {"task": "all", "base": {"n": 40, "format": 0.0, "accuracy": 45.0},
         "tuned": {"n": 40, "format": 95.0, "accuracy": 95.0}, "tuned_on_train": {"n": 20, "format": 95.0, "accuracy": 80.0}},
    ],
    "paired": {"items": 40, "accuracy_delta": 50.0, "accuracy_delta_ci": [32.5, 67.5],
               "b_only_correct": 21, "a_only_correct": 1, "mcnemar_p": 1.049e-05},
}
EXPECTED = """\
| task | n | base format % | base accuracy % | tuned format % | tuned accuracy % | tuned accuracy on train % |
|---|---:|---:|---:|---:|---:|---:|
| Counting | 20 | 0.0 | 90.0 | 90.0 | 90.0 | 80.0 (n=20) |
| Temporal Order | 20 | 0.0 | 0.0 | 100.0 | 100.0 | – |
| **all** | 40 | 0.0 | 45.0 | 95.0 | 95.0 | 80.0 (n=20) |

Paired (40 items): accuracy tuned - base +50.0 points (95% paired bootstrap CI +32.5 to +67.5); \
21 items fixed, 1 broken; exact McNemar p = 1.05e-05.

<sub>`make demo` on 2026-12-05, Test CPU, 2 cores; written by `make readme-demo` from runs/tiny/side_by_side.json.</sub>"""


def test_a_fixed_side_by_side_json_renders_the_expected_markdown():
    assert render(json.loads(json.dumps(RESULT)), "2026-12-05", "Test CPU, 2 cores") == EXPECTED


def test_rewriting_replaces_only_the_marked_block():
    readme = f"# title\n\nbefore\n{BEGIN}\n| old | table |\n\nold paired line\n{END}\nafter {BEGIN[:4]}\n"
    out = rewrite(readme, "NEW")
    assert out == f"# title\n\nbefore\n{BEGIN}\nNEW\n{END}\nafter {BEGIN[:4]}\n"
    assert rewrite(out, "NEW") == out  # idempotent
    for broken in ("no markers", f"{END}\nx\n{BEGIN}", f"{BEGIN}\n{BEGIN}\n{END}"):
        with pytest.raises(ValueError, match="demo-table:begin"):
            rewrite(broken, "NEW")


def test_the_command_rewrites_the_readme_from_the_json(tmp_path):
    sbs = tmp_path / "side_by_side.json"
    sbs.write_text(json.dumps(RESULT))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n")
    assert main([str(sbs), "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert text.startswith(f"intro\n{BEGIN}\n| task | n |") and text.endswith(f"{END}\noutro\n")
    assert "| **all** | 40 | 0.0 | 45.0 | 95.0 | 95.0 | 80.0 (n=20) |" in text and "old" not in text
    assert cpu_model() in text
    assert main([str(tmp_path / "missing.json"), "--readme", str(readme)]) == 1


def test_the_cpu_model_comes_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n\n"
                    "processor\t: 1\nmodel name\t: AMD EPYC 7B13\n")
    assert cpu_model(info).startswith("AMD EPYC 7B13, ")
