"""The documentation: the mkdocs site builds with ``--strict`` (no broken link or anchor, no docstring the API
reference can't read), the CLI reference is generated from the typer app as it is, and the README stays a
short entry point whose test command is the one CI runs.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_hook():  # type: ignore[no-untyped-def]
    """tools/cli_reference.py, the file mkdocs.yml names as a hook (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("cli_reference", ROOT / "tools" / "cli_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


cli_reference = load_hook()


def build_site(project: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_the_site_builds_strict_without_a_warning(tmp_path: Path) -> None:
    done = build_site(ROOT, tmp_path / "site")
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "WARNING" not in output, output
    cli_page = (tmp_path / "site" / "cli" / "index.html").read_text(encoding="utf-8")
    assert "tritonforge batch-infer" in cli_page  # the hook filled in the generated reference
    api_page = (tmp_path / "site" / "api" / "index.html").read_text(encoding="utf-8")
    assert "infer_many" in api_page  # mkdocstrings rendered the client's methods


@pytest.mark.slow
@pytest.mark.parametrize(
    ("planted", "expected"),
    [
        ("[gone](no-such-page.md)", "no-such-page.md"),
        ("[gone](server.md#no-such-anchor)", "no-such-anchor"),
    ],
)
def test_the_strict_build_fails_on_a_broken_link(tmp_path: Path, planted: str, expected: str) -> None:
    # The build test must be able to fail: a copy of the site with one broken link does not build.
    project = tmp_path / "project"
    shutil.copytree(ROOT / "docs", project / "docs")
    shutil.copytree(ROOT / "tools", project / "tools", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "mkdocs.yml", project / "mkdocs.yml")
    (project / "src").symlink_to(ROOT / "src")
    limits = project / "docs" / "known-limits.md"
    limits.write_text(limits.read_text(encoding="utf-8") + f"\n{planted}\n", encoding="utf-8")
    done = build_site(project, tmp_path / "site")
    assert done.returncode != 0
    assert expected in done.stdout + done.stderr


def visible_commands() -> dict[str, list[str]]:
    """Every visible command path -> the option names its --help shows (hidden ones left out)."""
    import typer

    from tritonforge.cli import app

    found: dict[str, list[str]] = {}

    def walk(cmd, path: list[str], parent) -> None:  # type: ignore[no-untyped-def]
        ctx = cmd.context_class(cmd, info_name=path[-1], parent=parent)
        options = [
            name
            for p in cmd.get_params(ctx)
            if not getattr(p, "hidden", False) and p.param_type_name == "option" and p.name != "help"
            for name in p.opts
        ]
        found[" ".join(path)] = options
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                if sub is not None and not sub.hidden:
                    walk(sub, [*path, name], ctx)

    walk(typer.main.get_command(app), ["tritonforge"], None)
    return found


def test_the_cli_reference_lists_every_command_and_option() -> None:
    page = cli_reference.reference()
    commands = visible_commands()
    assert len(commands) > 20
    for path, options in commands.items():
        if path == "tritonforge":
            continue
        heading = re.search(rf"^#+ `{re.escape(path)}`$", page, re.MULTILINE)
        assert heading is not None, f"{path} is missing from the CLI reference"
        section = page[heading.end() :].split("\n#", 1)[0]  # up to the next command's heading
        for option in options:
            assert f"<code>{option}" in section or f", {option}" in section, f"{path} {option} is not listed"


def test_the_cli_reference_shows_help_text_literally() -> None:
    # '<ref>' in a help text is text, not an HTML tag that Markdown would swallow
    page = cli_reference.reference()
    assert "&lt;ref&gt;" in page


def test_the_cli_page_keeps_the_marker_the_reference_replaces() -> None:
    assert cli_reference.MARKER in (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")


def test_the_readme_test_command_is_the_one_ci_runs() -> None:
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").strip().splitlines()[-1]
    assert ci in (ROOT / "README.md").read_text(encoding="utf-8").splitlines()


def test_the_readme_is_a_short_entry_point() -> None:
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert 100 <= len(lines) <= 250, f"README.md has {len(lines)} lines; the guides belong in docs/"


#: the project's documents speak of the project, not of how it was developed
HISTORY = re.compile(r"\b(" + "sess" + r"ion|" + "iss" + r"ue)s? #?\d+", re.IGNORECASE)
TEXT_SUFFIXES = {".md", ".py", ".yaml", ".yml", ".toml", ".txt", ".cfg", ".pbtxt", ".json"}


def test_no_document_or_comment_names_a_development_session_or_issue_number() -> None:
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.split()
    if not tracked:  # not a git checkout (an unpacked sdist): read the folders we ship instead
        tracked = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*") if ".venv" not in p.parts]
    hits = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in TEXT_SUFFIXES and path.name not in {"README.md", "run"}:
            continue
        if not path.is_file():
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if HISTORY.search(line) and "github.com" not in line:
                hits.append(f"{name}:{number}: {line.strip()}")
    assert hits == [], "\n".join(hits)


#: a document says what the project is and measures, not how its code or a figure moved over time: each
#: phrase names an earlier state of the code (a comparison kept as such needs a baseline the code still
#: has, named with its flag); "session N" / "issue N" are HISTORY's, checked in every file above
TOLD_HISTORY = re.compile(
    r"\bbefore these changes\b"
    r"|\bthe code before\b"
    r"|\bnow/before\b|\bbefore/after\b"
    r"|\bbefore and after\b(?!\s+(?:the|a|an|it|its|each|every|one)\b)"
    # "no longer" of the code ("it no longer hangs"), not of a state at run time ("no longer usable")
    r"|\bno longer\b(?!\s+(?:usable|in use|ready|loaded|served|serving|reachable|alive|listed|valid|there|"
    r"needed|has|have|holds|fits?|exists?)\b)"
    r"|\d(?:\.\d+)? ?(?:µs|us|ms|s|x|%|MiB|GiB|MB|GB)? ?-> ?\d",  # "3.83 -> 3.12 ms"
    re.IGNORECASE,
)


def told_history(text: str) -> list[tuple[int, str]]:
    """The lines of ``text`` that tell the history of the code (:data:`TOLD_HISTORY`), numbered from 1."""
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if TOLD_HISTORY.search(line)]


@pytest.mark.parametrize(
    "history",
    [
        "Throughput unchanged: infer/s now/before 0.99x.",
        "the same script run against the code before these changes",
        "alternated with the same script on the code before",
        "The figures (at 50 and 500 models, before and after) are in Benchmarks.",
        "A NUL in a model name no longer reaches another model.",
        "1.2x per sentence (3.83 -> 3.12 ms, 2.82 -> 2.34 ms)",
        "p99 went 7.1 ms -> 5.9 ms",
    ],
)
def test_a_document_telling_history_is_caught(history: str) -> None:
    assert told_history(f"# A page\n\n{history}\n") == [(3, history)]


@pytest.mark.parametrize(
    "present",
    [
        "checks the load before a load, and the counters before and after the run",
        "passes anything after `--` to tritonserver unchanged",
        "if that server is no longer usable when the retry leaves, or a model no longer fits",
        "served versions v1 -> v2; strings in -> 384-d embeddings out",
        "growth 50 → 500 (linear: 10x)",
    ],
)
def test_a_document_speaking_of_the_present_is_let_be(present: str) -> None:
    assert told_history(present) == []


def test_no_document_tells_the_history_of_the_code() -> None:
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    hits = [
        f"{page.relative_to(ROOT)}:{number}: {line}"
        for page in pages
        for number, line in told_history(page.read_text(encoding="utf-8"))
    ]
    assert hits == [], (
        "say what is true of the project today (a figure with its date, machine, command):\n"
        + ("\n".join(hits))
    )
