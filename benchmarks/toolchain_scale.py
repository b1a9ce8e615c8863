"""The toolchain at many models: each verb's time on repositories of 50, 200 and 500 tiny ONNX models.

Builds one repository per size (the same 8-16-3 ONNX MLP under every name, written by ``add_model``)
and times, in this process, what each verb does: ``add-model`` (every model, and one more into the full
repository), ``validate`` (offline), ``models`` (table and ``--json``), ``build`` (one ``find_built``
look-up per model, what a rebuild that skips unchanged models pays), ``slo`` (rules and dashboard for
every model), ``deploy`` (manifests, without the live checks), ``serve`` with explicit model control
(start with no model loaded, read the repository index, load three models) and ``monitor`` (one reading
and its table and JSON). Each row prints the time per model and the growth from the smallest size: a
verb that grows linearly has a flat time per model. Then ``validate --live`` on ``--validate-live N``
models, with the most model processes the server had alive at once.

Two verbs need a live server, and serving 500 Python-stub models costs ~34 MiB each (one process per
model instance), more than this machine should hold for a benchmark: ``serve`` starts with explicit
control and three models loaded (its cost depends on the repository's size, not on loaded models), and
``monitor`` reads a loopback copy of the live server's real ``/metrics`` text in which each loaded
model's series are repeated under every name of the repository (Triton's exposition, unchanged but for
the model label), so its parse, table and JSON are timed at the repository's size.

    python benchmarks/toolchain_scale.py [--sizes 50,200,500] [--repeat 3] [--validate-live 20] [--json F]
"""

from __future__ import annotations

import argparse
import contextlib
import http.server
import io
import json
import re
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from _common import machine_stamp, wide_console  # benchmarks/ is on sys.path
from onnx import TensorProto, helper, numpy_helper
from rich.progress import Progress
from rich.table import Table

MODELS_ALL: tuple[str, ...] = ("--limit", "0")  # every row in the table
LOADED = 3  # models loaded on the live server (the rest stay unloaded: explicit control)


def tiny_onnx(path: Path) -> Path:
    """x[N, 8] float32 -> probs[N, 3]: a softmax MLP with fixed weights (the same file for every name)."""
    import onnx

    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "w2"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", 3])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


def names(n: int) -> list[str]:
    return [f"m{i:04d}" for i in range(n)]


REPEAT = 3  # rounds of each verb that reads (--repeat); the median is shown with its spread


def timed(fn: Callable[[], Any], rounds: int | None = None) -> tuple[list[float], Any]:
    """``fn``'s time in each of ``rounds`` runs (default: REPEAT) and its last value."""
    times, value = [], None
    for _ in range(REPEAT if rounds is None else rounds):
        start = time.perf_counter()
        value = fn()
        times.append(time.perf_counter() - start)
    return times, value


def cli(*argv: str) -> int:
    """One ``tritonforge`` command in this process, its output thrown away; the exit code."""
    from tritonforge.cli import run

    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return run(list(argv))


@contextlib.contextmanager
def exposition(text: str) -> Iterator[str]:
    """A loopback HTTP endpoint answering ``text`` on /metrics (the replayed Triton exposition)."""
    body = text.encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def replicate(metrics: str, loaded: list[str], every: list[str]) -> str:
    """Triton's exposition with each loaded model's series repeated under the names of ``every`` (dealt
    round-robin to the loaded models), each family's series kept together as Triton writes them."""
    under: dict[str, list[str]] = {m: [] for m in loaded}
    for i, name in enumerate(every):
        under[loaded[i % len(loaded)]].append(name)
    out = []
    for line in metrics.splitlines():
        found = re.search(r'model="([^"]+)"', line)
        if found and found.group(1) in under:
            source = f'model="{found.group(1)}"'
            out.extend(line.replace(source, f'model="{name}"') for name in under[found.group(1)])
        elif not found:
            out.append(line)
    return "\n".join(out) + "\n"


def slo_file(path: Path, models: list[str]) -> Path:
    body = {"window": "5m", "models": {m: {"mean_latency_ms": 20, "error_rate": 0.01} for m in models}}
    path.write_text(json.dumps(body))  # JSON is YAML
    return path


def measure(size: int, work: Path, model_file: Path, live: bool) -> dict[str, list[float] | str]:
    from tritonforge.observe.monitor import render, snapshot
    from tritonforge.observe.slo import dashboard, load_slo, rules
    from tritonforge.registry import find_built
    from tritonforge.repository import add_model, check_repository

    repo = work / f"repo{size}"
    every = names(size)
    row: dict[str, list[float] | str] = {}
    row["add-model (each)"], _ = timed(lambda: [add_model(repo, n, model_file) for n in every], 1)

    def one_more() -> int:
        code = cli("add-model", str(repo), "extra", str(model_file))
        shutil.rmtree(repo / "extra")
        return code

    row["add-model (one more)"], code = timed(one_more)
    assert code == 0
    row["validate"], problems = timed(lambda: check_repository(repo))
    assert not [p for p in problems if p.severity == "error"], problems[:3]
    row["models (all rows)"], code = timed(lambda: cli("models", str(repo), *MODELS_ALL))
    assert code == 0
    row["models --match (one)"], code = timed(lambda: cli("models", str(repo), "--match", every[-1]))
    assert code == 0
    row["models --json"], code = timed(lambda: cli("models", str(repo), "--json"))
    assert code == 0
    row["build (skip unchanged)"], _ = timed(lambda: [find_built(repo, n, "no-such-key") for n in every])
    spec_path = slo_file(work / f"slo{size}.yaml", every)
    row["slo"], code = timed(lambda: cli("slo", str(spec_path), "--out", str(work / f"slo{size}")))
    assert code == 0
    spec = load_slo(spec_path)
    row["slo alert rules"] = f"{len(rules(spec)['groups'][1]['rules'])}"
    row["slo panels"] = f"{len(dashboard(spec)['panels'])}"
    row["deploy"], code = timed(
        lambda: cli("deploy", str(repo), "--out", str(work / f"deploy{size}"), "--force")
    )
    assert code == 0, "deploy failed"
    if not live:
        return row
    from tritonforge.server import EmbeddedServer

    server = EmbeddedServer(repo, model_control="explicit")
    try:
        row["serve (ready, none loaded)"], _ = timed(server.start, 1)
        row["serve (repository index)"], index = timed(server.repository_index)
        assert len(index) == size
        loaded = every[:LOADED]
        row[f"serve (load {LOADED})"], _ = timed(lambda: [server.load_model(n) for n in loaded], 1)
        from tritonforge.client import Client

        with Client(server.grpc_url) as client:
            for n in loaded:
                client.infer(n, {"x": np.ones((1, 8), np.float32)})
        real = _read(server.metrics_url)
    finally:
        server.stop()
    with exposition(replicate(real, loaded, every)) as url:
        row["monitor (reading)"], (snap, _) = timed(lambda: snapshot([url], interval_s=0.0))
        row["monitor (table, all rows)"], _ = timed(lambda: _render(render(snap)))
        row["monitor (JSON)"], _ = timed(lambda: json.dumps(snap.as_dict()))
        once = ("monitor", "--metrics-url", url, "--interval-s", "0.001", "--once")
        row["monitor (cli, first 50)"], code = timed(lambda: cli(*once, "--sort", "requests"))
        assert code == 0
        row["monitor (cli, all, $/1k)"], code = timed(
            lambda: cli(*once, "--limit", "0", "--price-per-hour", "3")
        )
        assert code == 0
    return row


def validate_live(count: int, work: Path, model_file: Path) -> dict[str, float]:
    """``validate --live`` on ``count`` models: seconds, and the most model processes alive at once (the
    server's children, sampled every 50 ms: one Python-backend stub per loaded model instance)."""
    import psutil

    from tritonforge.repository import add_model
    from tritonforge.server import EmbeddedServer
    from tritonforge.server.live import check_live

    repo = work / f"live{count}"
    for name in names(count):
        add_model(repo, name, model_file)
    peak, done = 0, threading.Event()
    with EmbeddedServer(repo, model_control="explicit") as server:
        assert server.pid is not None
        root = psutil.Process(server.pid)

        def sample() -> None:
            nonlocal peak
            while not done.wait(0.05):
                with contextlib.suppress(psutil.Error):
                    peak = max(peak, len(root.children(recursive=True)))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        start = time.perf_counter()
        results = check_live(repo, server=server)
        elapsed = time.perf_counter() - start
        done.set()
        sampler.join()
        left = sum(1 for e in server.repository_index() if e.get("state") == "READY")
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    return {"models": count, "seconds": elapsed, "peak_processes": peak, "left_loaded": left}


def _read(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(url if url.startswith("http") else f"http://{url}", timeout=30) as r:
        return str(r.read().decode())


def _render(table: Table) -> str:
    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    return ""


def _seconds(times: list[float]) -> str:
    """The median of the rounds and, for several, their spread (± half the range, % of the median)."""
    median = statistics.median(times)
    if len(times) < 2 or median <= 0:
        return f"{median:.3f}"
    return f"{median:.3f} ±{(max(times) - min(times)) / 2 / median * 100:.0f}%"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="50,200,500", help="repository sizes, comma-separated")
    parser.add_argument("--no-live", action="store_true", help="skip serve and monitor (no server)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds of each verb that only reads")
    parser.add_argument(
        "--validate-live", type=int, default=20, help="models for the validate --live run (0: skip)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    global REPEAT
    REPEAT = args.repeat
    sizes = [int(s) for s in args.sizes.split(",")]
    console = wide_console()
    stamp = machine_stamp()
    console.print(
        f"{stamp['at']} on {stamp['host']} ({stamp.get('cpu_model', '?')}, {stamp['cpus']} CPUs, "
        f"load {stamp['loadavg']}); command: python benchmarks/toolchain_scale.py "
        + " ".join(argv if argv is not None else sys.argv[1:])
    )
    results: dict[int, dict[str, list[float] | str]] = {}
    with tempfile.TemporaryDirectory(prefix="toolchain-scale-") as tmp:
        work = Path(tmp)
        model_file = tiny_onnx(work / "tiny.onnx")
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("repositories", total=len(sizes))
            for size in sizes:
                progress.update(task, description=f"{size} models")
                results[size] = measure(size, work, model_file, live=not args.no_live)
                progress.advance(task)
            live_check = None
            if args.validate_live and not args.no_live:
                progress.update(task, description=f"validate --live on {args.validate_live} models")
                live_check = validate_live(args.validate_live, work, model_file)
    first = sizes[0]
    table = Table(title=f"the toolchain at {', '.join(map(str, sizes))} tiny ONNX models (seconds)")
    table.add_column("verb", no_wrap=True)
    for size in sizes:
        table.add_column(f"{size} models", justify="right")
        table.add_column("ms/model", justify="right")
    table.add_column(f"growth {first}->{sizes[-1]} (linear: {sizes[-1] / first:g}x)", justify="right")
    for verb in results[first]:
        cells = []
        for size in sizes:
            value = results[size][verb]
            if isinstance(value, str):
                cells += [value, ""]
            else:
                cells += [_seconds(value), f"{statistics.median(value) / size * 1e3:.2f}"]
        a, b = (results[size][verb] for size in (first, sizes[-1]))
        a_value = float(a) if isinstance(a, str) else statistics.median(a)
        b_value = float(b) if isinstance(b, str) else statistics.median(b)
        table.add_row(verb, *cells, f"{b_value / a_value:.1f}x" if a_value > 0 else "-")
    console.print(table)
    console.print(
        f"serve and monitor: explicit model control with {LOADED} models loaded; monitor reads the live "
        "server's exposition with each loaded model's series repeated under every name (loopback)."
    )
    if live_check is not None:
        console.print(
            f"validate --live on {live_check['models']} models: {live_check['seconds']:.1f} s "
            f"({live_check['seconds'] / live_check['models']:.2f} s a model), at most "
            f"{live_check['peak_processes']} model process(es) alive at once, "
            f"{live_check['left_loaded']} left loaded"
        )
    if args.json:
        figures = {"machine": stamp, "sizes": sizes, "results": results, "validate_live": live_check}
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
