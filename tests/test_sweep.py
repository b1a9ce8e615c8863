"""Sweeps through the real embedded server: windows until stable, percentiles, Triton's server-side split,
throughput that agrees with Triton's own count, CSV/JSON/HTML out, and what happens when things go wrong."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from tritonforge.cli import app
from tritonforge.errors import ModelNotFoundError
from tritonforge.loadtest.bench import bench
from tritonforge.loadtest.sweep import SweepResult, SweepSettings, WindowResult, _stable, run_level, run_sweep
from tritonforge.loadtest.target import open_target
from tritonforge.server import EmbeddedServer

FAST = {"window_s": 0.5, "warmup_s": 0.2, "max_windows": 6, "stability_percent": 25.0}


@pytest.fixture(scope="module")
def repo(loadtest_repo: Path) -> Path:
    return loadtest_repo


@pytest.fixture(scope="module")
def served(loadtest_server: EmbeddedServer) -> EmbeddedServer:
    return loadtest_server  # shared with the locust and load-test-model tests: one server start-up


def sweep(
    url: str, model: str, settings: SweepSettings, client: str = "tritonforge", **kwargs: Any
) -> SweepResult:
    async def run() -> SweepResult:
        async with open_target(url, model, client=client) as target:  # type: ignore[arg-type]
            return await run_sweep(target.send, settings, model=model, stats=target.stats, **kwargs)

    return asyncio.run(run())


@pytest.mark.parametrize("client", ["tritonforge", "tritonclient"])
def test_sweep_throughput_agrees_with_tritons_request_count_within_5_percent(
    served: EmbeddedServer, client: str
) -> None:
    result = sweep(served.grpc_url, "mlp", SweepSettings(concurrency=(1, 4), **FAST), client=client)
    assert result.complete and [lv.level for lv in result.levels] == [1, 4]
    for level in result.levels:
        assert level.errors == 0 and level.requests > 0
        assert level.server_throughput_rps is not None
        assert level.throughput_rps == pytest.approx(level.server_throughput_rps, rel=0.05)
        p = level.latency_ms
        assert 0 < p["p50"] <= p["p90"] <= p["p95"] <= p["p99"]
        assert level.windows >= 3 and len(level.window_throughputs) == 3


def test_sweep_splits_server_time_into_queue_and_compute_from_tritons_statistics(
    served: EmbeddedServer,
) -> None:
    result = sweep(served.grpc_url, "mlp", SweepSettings(concurrency=(8,), **FAST))
    split = result.levels[0].server["mlp"]
    assert split["requests"] > 0 and split["failed"] == 0
    assert split["compute_infer_us"] > 0 and split["queue_us"] > 0
    assert split["compute_input_us"] > 0 and split["compute_output_us"] > 0
    # at concurrency 8 with a queue delay the batcher groups requests: more inferences than executions
    assert split["mean_batch"] > 1


def test_sweep_of_an_ensemble_reports_each_composing_model(served: EmbeddedServer) -> None:
    result = sweep(served.grpc_url, "pipe", SweepSettings(concurrency=(2,), **FAST))
    assert result.server_models == ("pipe", "mlp", "scale")
    level = result.levels[0]
    assert set(level.server) == {"pipe", "mlp", "scale"}
    mlp, scale = level.server["mlp"]["requests"], level.server["scale"]["requests"]
    # every request runs both steps; only those in flight at a window's edges are counted in one alone
    assert mlp > 0 and abs(mlp - scale) <= 2 * 2
    assert level.server["scale"]["compute_infer_us"] > 0
    assert level.throughput_rps == pytest.approx(level.server_throughput_rps, rel=0.05)


def test_request_rate_sweep_is_open_loop_and_agrees_with_tritons_count(served: EmbeddedServer) -> None:
    result = sweep(served.grpc_url, "mlp", SweepSettings(request_rates=(50, 100), **FAST))
    assert result.mode == "request_rate" and [lv.level for lv in result.levels] == [50.0, 100.0]
    for level in result.levels:
        assert level.errors == 0 and level.requests > 0
        assert level.throughput_rps == pytest.approx(level.server_throughput_rps, rel=0.05)


def test_level_is_stable_only_when_the_last_three_windows_agree_within_the_percentage() -> None:
    def window(rps: float, latency_s: float = 0.01) -> WindowResult:
        return WindowResult(
            duration_s=1.0, latencies_s=[latency_s] * int(rps), errors=0, error_samples=[], server={}
        )

    assert _stable([window(100), window(105), window(98)], 3, 10)
    assert not _stable([window(100), window(105)], 3, 10)
    assert not _stable([window(100), window(130), window(98)], 3, 10)
    assert not _stable([window(100), window(100, 0.01), window(100, 0.02)], 3, 10)
    assert _stable([window(10), window(100), window(101), window(99)], 3, 5)


def test_level_that_never_settles_is_marked_unstable_after_max_windows() -> None:
    calls = {"n": 0}

    async def slower_each_time() -> None:  # our own send edge: a load that keeps changing
        calls["n"] += 1
        await asyncio.sleep(0.0005 * calls["n"] ** 0.5)

    settings = SweepSettings(concurrency=(1,), window_s=0.2, warmup_s=0, max_windows=4, stability_percent=1)
    level = asyncio.run(run_level(slower_each_time, settings, 1))
    assert not level.stable and level.windows == 4


def test_failed_requests_are_counted_as_errors_with_a_sample_message(served: EmbeddedServer) -> None:
    import numpy as np

    async def run() -> SweepResult:
        bad = {"x": np.zeros((1, 5), dtype=np.float32)}  # wrong width: every request is refused
        async with open_target(served.grpc_url, "mlp", inputs=bad) as target:
            return await run_sweep(
                target.send, SweepSettings(concurrency=(2,), **FAST), model="mlp", stats=target.stats
            )

    level = asyncio.run(run()).levels[0]
    assert level.requests == 0 and level.errors > 0
    assert "x" in level.error_samples[0]


def test_bench_raises_model_not_found_for_an_unknown_model(served: EmbeddedServer, repo: Path) -> None:
    settings = SweepSettings(concurrency=(1,), **FAST)
    with pytest.raises(ModelNotFoundError, match=r"'nope'.*mlp"):
        bench("nope", settings=settings, url=served.grpc_url)
    with pytest.raises(ModelNotFoundError, match=r"'nope' is not in .*mlp, pipe, scale"):
        bench("nope", settings=settings, repository=repo)


def test_sweep_keeps_partial_results_and_says_where_it_stopped_when_the_server_dies(
    repo: Path, tmp_path: Path
) -> None:
    server = EmbeddedServer(repo, model_control="explicit", load_models=["mlp"])
    server.start()
    try:

        def kill_at_second_level(kind: str, data: Any) -> None:
            if kind == "window" and data["level"] == 2 and data["window"] == 1:
                assert server.pid is not None
                os.killpg(server.pid, signal.SIGKILL)

        result = bench(
            "mlp",
            settings=SweepSettings(concurrency=(1, 2, 4), **FAST),
            url=server.grpc_url,
            output=tmp_path / "out",
            on_event=kill_at_second_level,
        )
    finally:
        server.stop()
    assert [lv.level for lv in result.levels] == [1]
    assert result.stopped_at is not None and result.stopped_at.startswith("concurrency 2, window 2")
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())["sweeps"][0]
    assert saved["stopped_at"] == result.stopped_at and len(saved["levels"]) == 1
    assert "Stopped early" in (tmp_path / "out" / "report.html").read_text()


@pytest.mark.slow
def test_bench_cli_writes_csv_json_and_html_with_percentiles_errors_and_server_split(
    served: EmbeddedServer, tmp_path: Path
) -> None:
    out = tmp_path / "bench"
    run = CliRunner().invoke(
        app,
        [
            "bench",
            "pipe",
            "--url",
            served.grpc_url,
            "--concurrency",
            "1,2",
            "--window-s",
            "0.5",
            "--stability-percent",
            "25",
            "--out",
            str(out),
        ],
    )
    assert run.exit_code == 0, run.output
    with (out / "sweep.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["level"] for r in rows] == ["1", "2"]
    for column in (
        "throughput_rps",
        "server_throughput_rps",
        "p50_ms",
        "p90_ms",
        "p95_ms",
        "p99_ms",
        "errors",
        "stable",
        "pipe.queue_us",
        "mlp.compute_infer_us",
        "scale.compute_output_us",
    ):
        assert rows[0][column] != "", column
    for row in rows:
        assert float(row["throughput_rps"]) == pytest.approx(float(row["server_throughput_rps"]), rel=0.05)
    data = json.loads((out / "sweep.json").read_text())["sweeps"][0]
    assert data["model"] == "pipe" and data["stopped_at"] is None and len(data["levels"]) == 2
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "Server-side split" in page
    assert (out / "curves.png").read_bytes().startswith(b"\x89PNG")


def test_bench_and_tune_cli_exit_2_with_the_bad_value_shown_as_given(tmp_path: Path) -> None:
    # the value is reported as text: "[bold]" is not eaten as console markup
    for verb in (["bench", "m"], ["tune", "m", "--p99-budget-ms", "50"]):
        run = CliRunner().invoke(app, [*verb, "--repo", str(tmp_path), "--concurrency", "[bold]2"])
        assert run.exit_code == 2, run.output
        assert "'[bold]2'" in run.output


def test_bench_cli_exits_1_naming_the_models_there_for_an_unknown_model(served: EmbeddedServer) -> None:
    run = CliRunner().invoke(app, ["bench", "nope", "--url", served.grpc_url, "--concurrency", "1"])
    assert run.exit_code == 1
    assert "nope" in run.output and "mlp" in run.output
