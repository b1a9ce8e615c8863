"""Cost per 1,000 inferences, from a real bench run against the embedded server and an hourly price."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cli_runner import run_tritonforge
from tritonforge.errors import TritonForgeError
from tritonforge.observe.cost import bench_costs, cheapest, read_sweeps
from tritonforge.server import EmbeddedServer

FAST = {"window_s": 0.3, "warmup_s": 0.1, "stable_windows": 1, "max_windows": 2}


@pytest.fixture(scope="module")
def sweep_dir(server: EmbeddedServer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tritonforge.loadtest import SweepSettings, bench

    out = tmp_path_factory.mktemp("bench")
    # 4 rows per request: the cost is per inference (row), not per request
    bench(
        "mlp",
        settings=SweepSettings(concurrency=(1, 2), **FAST),
        url=server.grpc_url,
        output=out,
        inputs={"x": np.ones((4, 8), np.float32)},
        report=False,
    )
    return out


def test_cost_of_1000_inferences_is_the_hourly_price_over_inferences_per_hour(sweep_dir: Path) -> None:
    rows = bench_costs(read_sweeps(sweep_dir), price_per_hour=3.6)
    assert [r.level for r in rows] == [1.0, 2.0]
    for r in rows:
        assert r.inferences_per_s == pytest.approx(4 * r.requests_per_s)
        assert r.cost_per_1k == pytest.approx(3.6 / 3600 / r.inferences_per_s * 1000)
    (best,) = cheapest(rows).values()
    assert best.cost_per_1k == min(r.cost_per_1k for r in rows)  # type: ignore[type-var]


def test_cost_cli_prints_json_with_the_cheapest_level(sweep_dir: Path) -> None:
    done = run_tritonforge(
        "cost", str(sweep_dir / "sweep.json"), "--price-per-hour", "1.2", "--json", timeout=120, columns=None
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert len(data["levels"]) == 2 and data["cheapest"][0]["model"] == "mlp"


def test_cost_budget_leaves_out_levels_over_the_p99_budget(sweep_dir: Path) -> None:
    rows = bench_costs(read_sweeps(sweep_dir), price_per_hour=1.0)
    assert cheapest(rows, p99_budget_ms=1e-6) == {}


def test_read_sweeps_raises_naming_the_file_when_it_is_not_a_sweep(tmp_path: Path) -> None:
    bad = tmp_path / "other.json"
    bad.write_text('{"hello": 1}')
    with pytest.raises(TritonForgeError, match="holds no `sweeps`"):
        read_sweeps(bad)
    with pytest.raises(TritonForgeError, match=r"sweep file .*missing.json does not exist"):
        read_sweeps(tmp_path / "missing.json")
