"""``tritonforge deploy``: Kubernetes / KServe / compose manifests for a repository, sized and checked."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table

from tritonforge.commands import fail
from tritonforge.commands._output import make_console
from tritonforge.errors import DeployError, TritonForgeError

console = make_console()


class Metric(str, Enum):
    queue_time = "queue-time"
    queue_ratio = "queue-ratio"


_fail = fail  # one way to report errors for every verb (tritonforge.commands)


def _measure(repo: Path, model: str, levels: str) -> tuple[dict[str, Any], str]:
    """A fresh concurrency sweep of ``model`` on the embedded server (our bench)."""
    from tritonforge.loadtest import SweepSettings, bench
    from tritonforge.loadtest.bench import parse_levels

    settings = SweepSettings(concurrency=parse_levels(levels))
    with console.status(f"measuring '{model}' on the embedded server (concurrency {levels}) ..."):
        result = bench(model, settings=settings, repository=repo, report=False)
    return result.as_dict(), f"bench sweep of '{model}' just measured on the embedded server"


def deploy(
    repo: Path = typer.Argument(..., help="The model repository to deploy."),
    out: Path = typer.Option(Path("deploy"), "--out", help="Folder to write the manifests into."),
    force: bool = typer.Option(False, help="Replace OUT if it is not empty."),
    name: str = typer.Option("triton", help="Name of the Deployment, Services, HPA ..."),
    image: str | None = typer.Option(None, help="Triton image (default: NVIDIA's for Triton 2.51)."),
    model_store: str | None = typer.Option(
        None,
        help="s3://, gs://, as:// (read by Triton), pvc://CLAIM[/sub] or image://REF "
        "(default: pvc://NAME-models).",
    ),
    credentials_secret: str = typer.Option("", help="Secret with the object store's credentials."),
    gpus: int = typer.Option(0, help="GPUs per pod in the base (dev stays on CPU)."),
    prod_gpus: int = typer.Option(1, help="GPUs per pod in the prod overlay, KServe and compose."),
    replicas: int = typer.Option(2, help="Replicas in prod (overridden by --target-rps)."),
    min_replicas: int = typer.Option(2, help="HPA minimum in prod."),
    max_replicas: int = typer.Option(8, help="HPA maximum in prod."),
    cpu: str = typer.Option("2", help="CPU request per pod (limit: twice)."),
    memory: str = typer.Option("4Gi", help="Memory request per pod (limit: twice)."),
    metric: Metric = typer.Option(Metric.queue_time, help="What the autoscaler follows."),
    target_queue_ms: float = typer.Option(20.0, help="Target mean queue time per request (queue-time)."),
    target_queue_ratio: float = typer.Option(1.0, help="Target queue/compute time (queue-ratio)."),
    scale_down_window_s: int = typer.Option(300, help="Scale-down stabilisation window."),
    dev_namespace: str = typer.Option("tritonforge-dev", help="Namespace of the dev overlay."),
    prod_namespace: str = typer.Option("tritonforge-prod", help="Namespace of the prod overlay."),
    prometheus_url: str = typer.Option(
        "http://prometheus-operated.monitoring.svc:9090", help="Prometheus that KEDA and the adapter query."
    ),
    loadtests: Path = typer.Option(Path("loadtests"), help="Folder of locustfiles for the locust ConfigMap."),
    locustfile: str = typer.Option("any_model.py", help="The locustfile the locust pods run."),
    batch_model: str = typer.Option("", help="Model of the batch Job (default: the first one)."),
    batch_input: str = typer.Option("", help="Input of the batch Job (default: /data/input)."),
    batch_output: str = typer.Option("", help="Output of the batch Job (default: /data/output)."),
    batch_shards: int = typer.Option(4, help="Parallel shards of the batch Job."),
    tune: Path | None = typer.Option(None, help="tune.json of `tritonforge tune`: instance counts, sizing."),
    sweep: Path | None = typer.Option(None, help="sweep.json of `tritonforge bench`, for --target-rps."),
    measure: str | None = typer.Option(None, help="Measure this model now (embedded server) for sizing."),
    levels: str = typer.Option("1:16", help="Concurrency levels of --measure (1,2,4 or 1:16)."),
    target_rps: float | None = typer.Option(None, help="Size prod replicas for this many requests/s."),
    p99_budget_ms: float | None = typer.Option(None, help="Only levels within this p99 count as capacity."),
    utilisation: float = typer.Option(0.7, help="Share of a pod's measured capacity to plan for."),
    canary_steps: str = typer.Option(
        "", help="KServe canary plan: traffic percent per step, e.g. 5,25,50,100 (as `rollout --steps`)."
    ),
    canary_hold: int = typer.Option(300, help="Seconds each canary step is held and judged."),
    canary_max_error_rate: float = typer.Option(0.01, help="Canary plan: largest failed share of calls."),
    canary_max_latency_ms: float | None = typer.Option(None, help="Canary plan: largest mean latency (ms)."),
    canary_min_requests: int = typer.Option(100, help="Canary plan: calls needed before a step is judged."),
    restrict: list[str] = typer.Option(
        [],
        help="Restrict protocol groups to a header whose value is a Secret's key: "
        "GROUPS:HEADER=SECRET_NAME/KEY (repeatable; health stays open for the probes).",
    ),
    tls_secret: str = typer.Option("", help="kubernetes.io/tls Secret with gRPC's tls.crt and tls.key."),
    mtls: bool = typer.Option(False, "--mtls", help="Require client certificates (the Secret's ca.crt)."),
    check: bool = typer.Option(True, help="Validate every generated object offline afterwards."),
) -> None:
    """Write Kubernetes (kustomize base + overlays, HPA/KEDA on Triton's queue time), KServe, locust,
    batch Job and compose manifests for REPO into OUT, and check them offline."""
    from tritonforge.deploy import (
        DeploySpec,
        check_tree,
        generate,
        load_measurement,
        parse_model_store,
        parse_restriction,
        size_for,
    )
    from tritonforge.deploy.canary import parse_canary_steps
    from tritonforge.deploy.spec import DEFAULT_IMAGE

    try:
        store = parse_model_store(model_store or f"pvc://{name}-models", name=name, secret=credentials_secret)
        spec = DeploySpec(
            name=name,
            image=image or DEFAULT_IMAGE,
            store=store,
            replicas=replicas,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            cpu_request=cpu,
            cpu_limit=_twice(cpu),
            memory_request=memory,
            memory_limit=_twice(memory),
            gpus=gpus,
            prod_gpus=prod_gpus,
            metric="queue_time" if metric is Metric.queue_time else "queue_ratio",
            target_queue_us=round(target_queue_ms * 1000),
            target_queue_ratio=target_queue_ratio,
            scale_down_window_s=scale_down_window_s,
            dev_namespace=dev_namespace,
            prod_namespace=prod_namespace,
            locustfile=locustfile,
            batch_model=batch_model,
            batch_input=batch_input,
            batch_output=batch_output,
            batch_shards=batch_shards,
            prometheus_url=prometheus_url,
            canary_steps=parse_canary_steps(canary_steps) if canary_steps else (),
            canary_hold_s=canary_hold,
            restrictions=tuple(parse_restriction(r, index=i) for i, r in enumerate(restrict)),
            tls_secret=tls_secret,
            mtls=mtls,
        )
        thresholds: dict[str, float] = {
            "max_error_rate": canary_max_error_rate,
            "min_requests": canary_min_requests,
        }
        if canary_max_latency_ms is not None:
            thresholds["max_mean_latency_ms"] = canary_max_latency_ms
        sizing = None
        instances = None
        measured: tuple[dict[str, Any], dict[str, int], str] | None = None
        if tune is not None:
            measured = load_measurement(tune)
            instances = measured[1]
        if target_rps is not None:
            if sweep is not None:
                measured = load_measurement(sweep)
            elif measure is not None:
                data, source = _measure(repo, measure, levels)
                measured = (data, {}, source)
            if measured is None:
                raise DeployError(
                    "--target-rps needs a measured sweep: --sweep FILE, --tune FILE or --measure MODEL"
                )
            data, counts, source = measured
            sizing = size_for(
                target_rps,
                data,
                p99_budget_ms=p99_budget_ms,
                utilisation=utilisation,
                instances=counts or instances,
                source=source,
            )
        locustfiles = (
            {p.name: p.read_text() for p in sorted(loadtests.glob("*.py"))} if loadtests.is_dir() else None
        )
        with console.status(f"writing manifests for {repo} ..."):
            generated = generate(
                repo,
                out,
                spec,
                sizing=sizing,
                instances=instances,
                locustfiles=locustfiles,
                canary_thresholds=thresholds,
                force=force,
            )
        findings = check_tree(out) if check else []
    except (TritonForgeError, ValueError) as exc:
        raise _fail(exc if isinstance(exc, TritonForgeError) else DeployError(str(exc))) from None
    console.print(f"[bold]wrote {len(generated.files)} files into {out}[/]", highlight=False)
    for file in generated.files:
        console.print(f"  {file}", highlight=False, soft_wrap=True)
    if locustfiles is None:
        console.print(f"[yellow]no locust manifests:[/] {loadtests} is not a folder (give --loadtests)")
    if sizing is not None:
        console.print("[bold]Sizing[/]")
        for reason in sizing.reasons:
            console.print(f"  - {reason}", highlight=False, soft_wrap=True)
        console.print(
            f"  => prod: {sizing.replicas} replicas, HPA {sizing.min_replicas}..{sizing.max_replicas}",
            highlight=False,
        )
    for note in generated.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False, soft_wrap=True)
    if check:
        bad = [f for f in findings if not f.ok]
        methods: dict[str, int] = {}
        for f in findings:
            methods[f.how] = methods.get(f.how, 0) + 1
        how = ", ".join(f"{n} by {m}" for m, n in methods.items())
        colour = "red" if bad else "green"
        valid = len(findings) - len(bad)
        console.print(
            f"[{colour}]offline checks: {valid} of {len(findings)} objects valid[/] ({how})",
            highlight=False,
            soft_wrap=True,
        )
        if bad:
            table = Table(title="objects that failed their check")
            for column in ("file", "kind", "name", "checked against", "problem"):
                table.add_column(column, overflow="fold")
            for f in bad:
                table.add_row(f.file, f.kind, f.name, f.how, f.problem or "")
            console.print(table)
            raise typer.Exit(code=1)


def _twice(quantity: str) -> str:
    import re

    found = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", quantity.strip())
    if not found:
        raise typer.BadParameter(f"{quantity!r} is not a Kubernetes quantity such as 2, 500m or 4Gi")
    value = float(found.group(1)) * 2
    return f"{value:g}{found.group(2)}"


def register(app: typer.Typer) -> None:
    app.command()(deploy)
