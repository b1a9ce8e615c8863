"""The CLI speaks one vocabulary (docs/cli-vocabulary.md): every command's parameters are checked against it.

The typer app is walked as click sees it, so a verb added or changed anywhere is checked the day it lands.
The checker itself is tested on a small app that breaks each rule (a check that cannot fail is a defect).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer

from tritonforge.cli import app
from tritonforge.commands._renamed import renamed, renames_of

ROOT = Path(__file__).resolve().parents[1]
GLOSSARY = ROOT / "docs" / "cli-vocabulary.md"
RENAMING = ROOT / "src" / "tritonforge" / "commands" / "_renamed.py"

# Verbs other branches are reshaping: the lead removes each entry once that branch has landed.
PENDING: dict[str, str] = {}
PENDING_ACCESS: dict[str, str] = {}
PENDING_JSON: dict[str, str] = {}

# Verbs that act rather than report, as the glossary lists them.
NO_JSON: dict[str, str] = {
    "serve": "runs a server until stopped",
    "demo": "a narrated tour",
    "build": "its report is `models --json`",
    "slo": "writes rules.yml and dashboard.json into --out",
    "deploy": "writes manifests into --out",
}

FORBIDDEN = {
    "--repository": "--repo",
    "--output": "--out (written output) or --output-name (a tensor)",
    "--outputs": "--output-name",
    "--output-dir": "--out",
    "--out-dir": "--out",
    "--grpc": "--url",
    "--grpc-url": "--url",
    "--server": "--url",
    "--endpoint": "--url",
    "--metrics": "--metrics-url",
    "--batch": "--batch-size",
    "--levels": "--concurrency",
    "--filter": "--match",
    "--pattern": "--match",
    "--grep": "--match",
    "--order-by": "--sort",
    "--sort-by": "--sort",
    "--top": "--limit",
    "--max-rows": "--limit",
    "--page-size": "--limit",
}
TIME_WORDS = {"hold", "interval", "timeout", "window", "grace", "poll", "delay", "wait", "period"}
TIME_WORDS |= {"latency", "age", "ttl", "budget", "duration", "deadline"}
UNITS = {"s", "ms", "us"}
SPELLED_UNITS = {"secs", "sec", "seconds", "msecs", "millis", "mins", "minutes"}
ACCESS = {"auth", "tls_root_cert", "tls_client_cert", "tls_client_key", "tls_server_name"}
# Options whose values are a fixed set: each must be an enum (the help lists them, click refuses others).
CHOICES = {
    ("serve", "--model-control"),
    ("add-model", "--kind"),
    ("export", "--format"),
    ("quantize", "--mode"),
    ("bench", "--client"),
}
# Help that lists a fixed set of values ("a, b or c" / "'a' (...) or 'b'") on a free-text option.
LISTED_VALUES = re.compile(
    r"^'?[a-z0-9][\w.-]*'?( \([^)]*\))?(, '?[a-z0-9][\w.-]*'?( \([^)]*\))?)* or '?[a-z0-9]"
)


def walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    """Every leaf command as ``("ensemble check", click_command)``."""
    subcommands = getattr(command, "commands", None)
    if subcommands:
        for name, sub in subcommands.items():
            yield from walk(sub, (*path, name))
    else:
        yield " ".join(path), command


def commands(of: typer.Typer = app) -> dict[str, Any]:
    return dict(walk(typer.main.get_command(of)))


def _long_opts(param: Any) -> list[str]:
    return [o for o in param.opts if o.startswith("--")]


def violations(path: str, command: Any) -> list[str]:
    """What in ``command``'s parameters breaks the vocabulary, one line each."""
    found: list[str] = []
    params = [p for p in command.params if not getattr(p, "hidden", False) and p.name != "help"]
    names = {p.name for p in params}
    verb = path.split(" ")[0]
    for p in params:
        where = f"{path} {(_long_opts(p) or [p.name])[0]}"
        options = p.param_type_name == "option"
        if p.name == "repository" or any(o.startswith("--repository") for o in p.opts):
            found.append(f"{where}: the repository is `repo` (REPO, or --repo where optional)")
        if p.name == "repo":
            if options and _long_opts(p) != ["--repo"]:
                found.append(f"{where}: the repository option is spelled --repo")
            if not options and not p.required:
                found.append(f"{where}: a positional REPO is required (--repo where it is optional)")
        elif "model repository" in (p.help or "") and p.name not in ("repo", "model_store"):
            found.append(f"{where}: a model repository parameter is named `repo`")
        if not options:
            continue
        longs = _long_opts(p)
        if len(longs) > 1:
            found.append(f"{where}: one spelling per option, not {longs} (old ones: @renamed)")
        for opt in longs + [o for o in p.secondary_opts if o.startswith("--")]:
            if opt in FORBIDDEN:
                found.append(f"{where}: spelled {FORBIDDEN[opt]}")
            words = opt.removeprefix("--").removeprefix("no-").split("-")
            if SPELLED_UNITS & set(words):
                found.append(f"{where}: units as -s, -ms or -us")
            elif TIME_WORDS & set(words) and words[-1] not in UNITS:
                found.append(f"{where}: a time carries its unit in the flag (-s, -ms, -us)")
        if "--out" in p.opts and "-o" not in p.opts:
            found.append(f"{where}: --out has the short form -o")
        if p.name == "url" and longs != ["--url"]:
            found.append(f"{where}: a gRPC server is --url")
        if p.name == "metrics_url" and longs != ["--metrics-url"]:
            found.append(f"{where}: a metrics endpoint is --metrics-url")
        if p.name == "as_json" and longs != ["--json"]:
            found.append(f"{where}: machine-readable output is --json")
        choice = p.type_descriptor.is_choice
        if (path, longs[0] if longs else "") in CHOICES and not choice:
            found.append(f"{where}: a fixed set of values is an enum")
        elif not choice and p.type_descriptor.annotation is str and LISTED_VALUES.match(p.help or ""):
            found.append(f"{where}: its help lists values; make it an enum")
    server_options = {p.name for p in params if p.param_type_name == "option"} & {"url", "metrics_url"}
    if server_options and not names >= ACCESS and verb not in PENDING_ACCESS:
        found.append(f"{path}: talks to a server, so takes the access options (commands/access.with_access)")
    if not any("--json" in p.opts for p in params) and verb not in NO_JSON and verb not in PENDING_JSON:
        found.append(f"{path}: prints results, so takes --json (or list it with a reason in NO_JSON)")
    all_opts = {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
    for old, new in renames_of(command.callback).items():
        if new not in all_opts:
            found.append(f"{path}: renamed {old} -> {new}, but it has no {new}")
        if old in all_opts:
            found.append(f"{path}: {old} is both renamed and still an option")
    return found


@pytest.mark.parametrize("path", sorted(commands()))
def test_command_follows_the_cli_vocabulary(path: str) -> None:
    if path.split(" ")[0] in PENDING:
        pytest.skip(PENDING[path.split(" ")[0]])
    assert violations(path, commands()[path]) == []


def test_every_renamed_option_is_listed_in_the_glossary() -> None:
    text = GLOSSARY.read_text()
    row = r"^\| `([a-z -]+)` \| `(--[a-z0-9-]+)`[^|]*\| `(--[a-z0-9-]+)` \|$"
    listed = set(re.findall(row, text, flags=re.M))
    renames = {
        (path, old, new)
        for path, command in commands().items()
        for old, new in renames_of(command.callback).items()
    }
    assert renames, "no renamed options found: is install_renamed_options still called by cli.py?"
    assert renames == listed, "docs/cli-vocabulary.md's 'Renamed options' table differs from the CLI"


def _commands_in(text: str) -> Iterator[str]:
    """Each ``tritonforge ...`` command line (continuations joined) and each `verb ...` in backticks."""
    joined = re.sub(r"\\\n\s*", " ", text)
    for line in joined.splitlines():
        for match in re.finditer(r"tritonforge (.*)", line):
            # it ends at `--` (tritonserver's own flags follow), a comment, or prose naming tritonserver's
            yield re.split(r" -- | #|`|\)|;|, or |tritonserver", match.group(1))[0]
        yield from re.findall(r"`([a-z][a-z-]+ [^`]*)`", line)


def stale_spellings(text: str, renames: dict[str, dict[str, str]]) -> list[str]:
    """``verb ... --old is now --new`` for each renamed spelling that ``text`` still uses."""
    stale = []
    for command in _commands_in(text):
        verb = command.split(" ")[0]
        for old, new in renames.get(verb, {}).items():
            if re.search(rf"(?<![\w-]){re.escape(old)}(?![\w-])", command):
                stale.append(f"`{verb} ... {old}` is now {new}")
    return stale


def test_docs_tools_and_generated_commands_use_no_renamed_spelling() -> None:
    renames = {path: renames_of(command.callback) for path, command in commands().items()}
    files = [
        ROOT / "README.md",
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted((ROOT / "tools").rglob("*.py")),
    ]
    files += [*sorted((ROOT / "benchmarks").rglob("*.py")), *sorted((ROOT / "loadtests").rglob("*.py"))]
    files += sorted((ROOT / "src" / "tritonforge").rglob("*.py"))
    stale = [
        f"{file.relative_to(ROOT)}: {found}"
        for file in files
        if file not in (GLOSSARY, RENAMING)  # they name the old spellings on purpose
        for found in stale_spellings(file.read_text(), renames)
    ]
    assert not stale, "\n".join(stale)


def test_the_docs_check_finds_old_spellings_in_commands_and_backticks_but_not_after_a_double_dash() -> None:
    renames = {"bench": {"--batch": "--batch-size"}, "serve": {"--exit-timeout-secs": "--exit-timeout-s"}}
    text = (
        "tritonforge bench m --concurrency 1 \\\n    --batch 4\n"
        "a note on `bench --batch` here\n"
        "tritonforge serve R -- --exit-timeout-secs=5\n"
        "(tritonforge serve --model-control explicit, or tritonserver --exit-timeout-secs=5)\n"
        "tritonforge bench m --batch-size 4\n"
    )
    assert stale_spellings(text, renames) == ["`bench ... --batch` is now --batch-size"] * 2


# -- the checker catches what it is for ---------------------------------------------------------------


def _bad_app() -> typer.Typer:
    bad = typer.Typer()

    @bad.command()
    def sweep(
        repository: Annotated[Path, typer.Option(help="The model repository.")] = Path("r"),
        output: Annotated[Path, typer.Option("--output", help="Where results go.")] = Path("o"),
        out: Annotated[Path, typer.Option("--out", help="Where results go.")] = Path("o"),
        batch: Annotated[int, typer.Option(help="Rows per request.")] = 1,
        hold: Annotated[float, typer.Option(help="Seconds per step.")] = 1.0,
        poll_secs: Annotated[int, typer.Option(help="Seconds between scans.")] = 1,
        client: Annotated[str, typer.Option(help="'a' (fast) or 'b' (raw).")] = "a",
        url: Annotated[str, typer.Option("--url", "--server", help="A server.")] = "x",
    ) -> None:
        """A verb breaking each rule."""

    @bad.command()
    @renamed({"--old": "--new"})
    def other(repo: Annotated[Path | None, typer.Argument(help="The model repository.")] = None) -> None:
        """Another."""

    return bad


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("sweep", "sweep --repository: the repository is `repo`"),
        ("sweep", "sweep --output: spelled --out (written output) or --output-name"),
        ("sweep", "sweep --out: --out has the short form -o"),
        ("sweep", "sweep --batch: spelled --batch-size"),
        ("sweep", "sweep --hold: a time carries its unit in the flag"),
        ("sweep", "sweep --poll-secs: units as -s, -ms or -us"),
        ("sweep", "sweep --client: its help lists values; make it an enum"),
        ("sweep", "sweep --url: one spelling per option"),
        ("sweep", "sweep: talks to a server, so takes the access options"),
        ("sweep", "sweep: prints results, so takes --json"),
        ("other", "other repo: a positional REPO is required"),
        ("other", "other: renamed --old -> --new, but it has no --new"),
    ],
)
def test_the_checker_catches_a_verb_that_breaks_the_vocabulary(path: str, expected: str) -> None:
    found = violations(path, commands(_bad_app())[path])
    assert [v for v in found if v.startswith(expected)], found
