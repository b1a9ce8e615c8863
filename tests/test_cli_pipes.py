"""CLI output survives a pipe: with stdout/stderr not a terminal, no name is folded over two lines.

The verbs run as a real process (``python -m tritonforge``) with both streams piped, as in a CI log, and
the output is grepped line by line for names longer than 80 columns would hold.
"""

from __future__ import annotations

import functools
import io
import textwrap
from pathlib import Path

from rich.table import Table

import tiny_models
from cli_runner import run_tritonforge
from tritonforge.commands._output import make_console, print_problems
from tritonforge.repository import add_model

LONG_MODEL = "no_such_model_with_a_name_long_enough_to_fold_at_eighty_columns_zz"


run_piped = functools.partial(run_tritonforge, timeout=120, columns=80)


def lines_with(text: str, *needles: str) -> list[str]:
    return [line for line in text.splitlines() if all(n in line for n in needles)]


def test_ensemble_check_piped_prints_each_problem_on_one_line_with_file_step_and_fix(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    (specs / "p.yaml").write_text(
        textwrap.dedent(f"""
        name: pipeline_with_a_long_name
        inputs: [{{name: x, dtype: FP32, dims: [8]}}]
        outputs: [probs]
        steps: [{{name: the_first_step, model: {LONG_MODEL}, inputs: [x], outputs: [probs]}}]
        """)
    )
    # the problems are the report (stdout); stderr holds the one error line every verb gives
    result = run_piped("ensemble", "check", "specs", "--repo", "repo", cwd=tmp_path)
    assert result.returncode == 1
    [line] = lines_with(result.stdout, LONG_MODEL)
    assert line.startswith("specs/p.yaml: pipeline_with_a_long_name/the_first_step: model ")
    assert " — build it into the repository first" in line
    assert "┃" not in result.stdout and "│" not in result.stdout  # no table when piped


def test_validate_piped_prints_each_problem_on_one_line_with_the_whole_model_name(tmp_path: Path) -> None:
    name = "a_model_whose_name_is_long_enough_to_fold_at_eighty_columns_zz"
    (tmp_path / "repo" / name / "1").mkdir(parents=True)
    (tmp_path / "repo" / name / "config.pbtxt").write_text("garbage {\n")
    result = run_piped("validate", "repo", cwd=tmp_path)
    assert result.returncode == 1
    [line] = lines_with(result.stdout, f"error: {name}: ")
    assert "config.pbtxt" in line


def test_models_table_piped_holds_each_long_name_on_one_line(tmp_path: Path) -> None:
    name = "a_served_model_whose_name_is_long_enough_to_fold_at_eighty_zz"
    add_model(tmp_path / "repo", name, tiny_models.mlp_onnx(tmp_path / "m.onnx"), max_batch_size=4)
    result = run_piped("models", "repo", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    [row] = lines_with(result.stdout, name)
    assert "onnxruntime_onnx" in row  # the other columns of the row stay on its line


def test_piped_console_renders_tables_at_their_natural_width_and_rules_at_eighty() -> None:
    out = io.StringIO()
    console = make_console(file=out)
    table = Table(title="t")
    for column in ("model", "state"):
        table.add_column(column)
    table.add_row("m" * 150, "READY")
    console.print(table)
    console.rule("section")
    console.print("wrote " + "/very/long/path" * 12)
    lines = out.getvalue().splitlines()
    assert lines_with(out.getvalue(), "m" * 150, "READY")
    assert lines_with(out.getvalue(), "wrote /very/long/path", "path" * 0 + "/very/long/path" * 11)
    assert max(len(line) for line in lines if "section" in line) == 80


def test_print_problems_draws_a_table_at_a_terminal() -> None:
    out = io.StringIO()
    console = make_console(file=out)
    console._force_terminal = True  # as rich's own force_terminal=True would
    print_problems(console, "1 problem(s)", [("p/s", "bad", "fix it")])
    assert "┃" in out.getvalue() or "│" in out.getvalue()
