"""The toolchain at many models: listings that filter, sort and page, and verbs whose reads and server
calls follow the models they touch, not the size of the repository.

Reads are counted through Python's audit hooks (every ``open`` of a file, the real call), server state
through Triton's own repository index: no mock of the file system or of Triton.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import tiny_models
from test_loadtest_models import build_loadtest_repository
from tritonforge.cli import app
from tritonforge.client import Client
from tritonforge.registry import find_built, list_models
from tritonforge.repository import add_model
from tritonforge.server import EmbeddedServer
from tritonforge.server.live import check_live

runner = CliRunner()

_OPENED: list[list[str]] = []  # the paths opened while a `manifests_opened()` block runs


def _audit(event: str, args: tuple) -> None:
    if event == "open" and _OPENED and isinstance(args[0], (str, Path)):
        _OPENED[-1].append(str(args[0]))


sys.addaudithook(_audit)  # a hook stays for the process; it records only inside the block below


@contextlib.contextmanager
def manifests_opened() -> Iterator[list[str]]:
    """The model of each ``manifest.json`` opened inside the block."""
    opened: list[str] = []
    _OPENED.append(opened)
    found: list[str] = []
    try:
        yield found
    finally:
        _OPENED.pop()
        found += [Path(p).parent.parent.name for p in opened if Path(p).name == "manifest.json"]


@pytest.fixture(scope="module")
def wide_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """24 models: digits_00..11 (a small MLP) and text_00..11 (a larger one), one version each."""
    root = tmp_path_factory.mktemp("wide")
    small = tiny_models.mlp_onnx(root / "small.onnx", hidden=8)
    large = tiny_models.mlp_onnx(root / "large.onnx", hidden=64)
    for i in range(12):
        for name, source in ((f"digits_{i:02d}", small), (f"text_{i:02d}", large)):
            # the size `models` shows is the registered artifact's, as `register` records it
            add_model(root / "repo", name, source, manifest={"artifact": {"bytes": source.stat().st_size}})
    return root / "repo"


def _models_json(*args: str) -> tuple[list[dict], str]:
    done = runner.invoke(app, ["models", *args, "--json"])
    assert done.exit_code == 0, done.output
    return json.loads(done.stdout), done.stderr


def test_models_match_sort_and_limit_narrow_the_json_and_say_what_they_left_out(wide_repo: Path) -> None:
    every, note = _models_json(str(wide_repo))
    assert len(every) == 24 and not note  # JSON carries every row unless --limit is given
    text, _ = _models_json(str(wide_repo), "--match", "text_*")
    assert [r["model"] for r in text] == [f"text_{i:02d}" for i in range(12)]
    both, _ = _models_json(str(wide_repo), "--match", "text_01", "--match", "digits_1?")
    assert [r["model"] for r in both] == ["digits_10", "digits_11", "text_01"]
    largest, note = _models_json(str(wide_repo), "--sort", "size", "--limit", "5")
    assert len(largest) == 5 and {r["model"][:4] for r in largest} == {"text"}
    assert "19 of 24 versions not shown" in note
    none, _ = _models_json(str(wide_repo), "--match", "nothing*")
    assert none == []


def test_models_table_pages_and_its_caption_counts_the_hidden_rows(wide_repo: Path) -> None:
    done = runner.invoke(app, ["models", str(wide_repo), "--limit", "4"], env={"COLUMNS": "200"})
    assert done.exit_code == 0, done.output
    assert "digits_03" in done.stdout and "digits_04" not in done.stdout
    assert "20 of 24 versions not shown: narrow with --match, or --limit 0 to show all" in done.stdout
    done = runner.invoke(app, ["models", str(wide_repo), "--limit", "0"], env={"COLUMNS": "200"})
    assert "text_11" in done.stdout and "not shown" not in done.stdout
    bad = runner.invoke(app, ["models", str(wide_repo), "--sort", "colour"])
    assert bad.exit_code == 2 and "colour" in bad.output


def test_models_and_find_built_read_only_the_manifests_of_the_models_they_list(wide_repo: Path) -> None:
    with manifests_opened() as read:
        _models_json(str(wide_repo), "--match", "text_03")
    assert read == ["text_03"]  # not 24 manifests for one model's row
    with manifests_opened() as read:
        assert find_built(wide_repo, "digits_05", "no-such-build-key") is None
    assert read == ["digits_05"]  # a build skipping unchanged models reads each model's own, once
    with manifests_opened() as read:
        rows = list_models(wide_repo)
    assert sorted(read) == sorted(r.model for r in rows) and len(read) == 24


@pytest.fixture(scope="module")
def explicit(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    """mlp, scale and the ensemble pipe (mlp then scale), explicit control, scale loaded at start."""
    repo = build_loadtest_repository(tmp_path_factory.mktemp("explicit"))
    with EmbeddedServer(repo, model_control="explicit", load_models=["scale"]) as server:
        yield server


def _ready(server: EmbeddedServer) -> set[str]:
    return {e["name"] for e in server.repository_index() if e.get("state") == "READY"}


def test_validate_live_unloads_each_model_it_loaded_and_keeps_those_loaded_before(
    explicit: EmbeddedServer,
) -> None:
    assert _ready(explicit) == {"scale"}
    results = {r.model: r for r in check_live(explicit.repositories[0], server=explicit)}
    assert all(r.ok for r in results.values()), results
    assert set(results) == {"mlp", "pipe", "scale"}
    # pipe brought mlp in; both went out again, scale (loaded before) stayed
    assert _ready(explicit) == {"scale"}


def test_loading_a_model_keeps_what_the_client_knows_of_the_others(explicit: EmbeddedServer) -> None:
    x = np.ones((1, 3), np.float32)
    with Client(explicit.grpc_url, metrics=False) as client:
        client.infer("scale", {"p": x})
        known = {k[0] for k in client._model_metadata} | {k[0] for k in client._headers}
        assert known == {"scale"}
        client.load_model("mlp")
        client.unload_model("mlp")
        # scale's metadata and request header survive mlp's load and unload: nothing to fetch again
        assert {k[0] for k in client._model_metadata} == {"scale"}
        assert {k[0] for k in client._headers} == {"scale"}
        client.infer("scale", {"p": x})


def test_serve_lists_a_large_repository_by_state_with_the_models_not_ready_first() -> None:
    from tritonforge.commands._output import make_console
    from tritonforge.commands._rows import TABLE_ROWS
    from tritonforge.commands.serve import _index_table

    index = [{"name": f"m{i:03d}", "version": "1", "state": "READY"} for i in range(120)]
    index[77] = {"name": "m077", "version": "1", "state": "UNAVAILABLE", "reason": "boom"}
    out = io.StringIO()
    make_console(file=out).print(_index_table(Path("repo"), index))  # laid out as in a pipe: lines whole
    text = out.getvalue()
    assert "Triton serving repo: 119 READY, 1 UNAVAILABLE" in text
    assert text.index("m077") < text.index("m000")  # the one in trouble is never paged out
    assert f"{120 - TABLE_ROWS} more not shown; `tritonforge models repo` lists every model" in text
    assert "m119" not in text


def test_slo_cli_at_500_models_lists_a_screenful_and_writes_every_model(tmp_path: Path) -> None:
    lines = ["models:", *(f"  m{i:03d}: {{error_rate: 0.01}}" for i in range(500))]
    (tmp_path / "slo.yaml").write_text("\n".join(lines) + "\n")
    done = runner.invoke(app, ["slo", str(tmp_path / "slo.yaml"), "--out", str(tmp_path / "out")])
    assert done.exit_code == 0, done.output
    assert "m049" in done.stdout and "m050" not in done.stdout and "450 more rows in" in done.stdout
    assert "1 alerts" in done.stdout and "500 models: the top 10 and a row per model" in done.stdout
    board = json.loads((tmp_path / "out" / "dashboard.json").read_text())
    assert len(board["templating"]["list"][1]["options"]) == 500


def test_the_canary_plan_selects_each_model_by_its_literal_name() -> None:
    from tritonforge.deploy.canary import step_queries
    from tritonforge.deploy.spec import DeploySpec

    names = tuple(f"m.{i:03d}" for i in range(500))
    queries = step_queries(DeploySpec().replace(models=names), "prod")
    assert len(queries) == 3  # whatever the number of models
    # "m.001" as a regex would also match "mx001": the dot is escaped (doubled in the PromQL string)
    assert 'model=~"m\\\\.000|m\\\\.001|' in queries["requests"]
