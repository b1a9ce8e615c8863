"""``tritonforge deploy``: Kubernetes / KServe / compose manifests for a repository, sized and checked."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Any

import typer
from rich.table import Table
from rich.text import Text

from tritonforge.commands import fail
from tritonforge.commands._cache import CACHE_MAX_MEMORY, CACHE_MAX_MODELS, PIN
from tritonforge.commands._output import make_console
from tritonforge.commands._renamed import deprecated, renamed
from tritonforge.errors import DeployError, TritonForgeError

console = make_console()


class Metric(str, Enum):
    queue_time = "queue-time"
    queue_ratio = "queue-ratio"
    gpu_utilization = "gpu-utilization"


class Accelerator(str, Enum):
    cuda = "cuda"
    tensorrt = "tensorrt"
    tensorrt_fp16 = "tensorrt-fp16"


class KServeMode(str, Enum):
    raw = "raw"
    serverless = "serverless"
    modelmesh = "modelmesh"


_fail = fail  # one way to report errors for every verb (tritonforge.commands)


def _measure(repo: Path, model: str, concurrency: str) -> tuple[dict[str, Any], str]:
    """A fresh concurrency sweep of ``model`` on the embedded server (our bench)."""
    from tritonforge.loadtest import SweepSettings, bench
    from tritonforge.loadtest.bench import parse_levels

    settings = SweepSettings(concurrency=parse_levels(concurrency))
    with console.status(f"measuring '{model}' on the embedded server (concurrency {concurrency}) ..."):
        result = bench(model, settings=settings, repository=repo, report=False)
    return result.as_dict(), f"bench sweep of '{model}' just measured on the embedded server"


def _labels(items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DeployError(
                f"--monitor-label {item!r}: expected KEY=VALUE, e.g. release=kube-prometheus-stack"
            )
        out[key] = value
    return out


def deploy(
    repo: Path = typer.Argument(..., help="The model repository to deploy."),
    out: Path = typer.Option(Path("deploy"), "--out", "-o", help="Folder to write the manifests into."),
    force: bool = typer.Option(False, help="Replace OUT if it is not empty."),
    name: str = typer.Option("triton", help="Name of the Deployment, Services, HPA ..."),
    image: str | None = typer.Option(
        None, help="Triton image to run or build FROM (default: NVIDIA's for Triton 2.51)."
    ),
    registry: str = typer.Option("", help="Registry of the images built here (e.g. ghcr.io/acme)."),
    image_pull_secret: list[str] = typer.Option([], help="Secret for pulling the images (repeatable)."),
    model_store: str | None = typer.Option(
        None,
        help="s3://, gs://, as:// (read by Triton), pvc://CLAIM or pvc://CLAIM/SUBPATH, or "
        "image://REF:TAG (default: image://NAME-models:VERSION, copied into the pod).",
    ),
    storage_class: str = typer.Option(
        "", help="pvc:// stores: a class offering ReadOnlyMany; the claim is then generated."
    ),
    store_size: str = typer.Option("20Gi", help="Size of the repository copy (image) or claim (pvc)."),
    credentials_secret: str = typer.Option("", help="Secret with the object store's credentials."),
    workload_identity: str = typer.Option(
        "", help="IAM role ARN (IRSA), GKE service account or Azure client id, instead of static keys."
    ),
    gpus: int = typer.Option(0, help="GPUs per server pod; the models' instance groups follow them."),
    gpu_accelerator: Accelerator = typer.Option(
        Accelerator.cuda, help="ONNX Runtime models on GPUs: CUDA, or TensorRT (FP16 opt-in)."
    ),
    allow_idle_gpus: bool = typer.Option(
        False, "--allow-idle-gpus", help="Ask for --gpus even when no model runs on a GPU."
    ),
    replicas: int | None = typer.Option(None, hidden=True, help="Deprecated: the HPA owns the scale."),
    min_replicas: int = typer.Option(2, help="HPA minimum in prod."),
    max_replicas: int = typer.Option(8, help="HPA maximum in prod."),
    cpu: str = typer.Option("2", help="CPU request per pod (limit: twice)."),
    memory: str = typer.Option("4Gi", help="Memory request per pod (limit: twice)."),
    scratch_size: str = typer.Option("20Gi", help="Size limit of the pods' /tmp (object-store downloads)."),
    priority_class: str = typer.Option("", help="PriorityClass of the server pods."),
    metric: Metric = typer.Option(Metric.queue_time, help="What the autoscaler follows."),
    target_queue_ms: float = typer.Option(20.0, help="Target mean queue time per request (queue-time)."),
    target_queue_ratio: float = typer.Option(1.0, help="Target queue/compute time (queue-ratio)."),
    target_gpu_utilization: float = typer.Option(0.8, help="Target GPU utilisation, 0-1 (gpu-utilization)."),
    scale_down_window_s: int = typer.Option(300, help="Scale-down stabilisation window."),
    monitor_label: list[str] = typer.Option(
        [],
        help="KEY=VALUE on the ServiceMonitor/PodMonitor, e.g. release=kube-prometheus-stack (repeatable).",
    ),
    monitoring_namespace: str = typer.Option("monitoring", help="Namespace of Prometheus and the adapter."),
    dev_namespace: str = typer.Option("tritonforge-dev", help="Namespace of the dev overlay."),
    prod_namespace: str = typer.Option(
        "tritonforge-prod", help="Namespace of the prod overlay, KServe, locust and the batch Job."
    ),
    prometheus_url: str = typer.Option(
        "http://prometheus-operated.monitoring.svc:9090", help="Prometheus that KEDA and the adapter query."
    ),
    kserve_mode: KServeMode = typer.Option(
        KServeMode.raw,
        help="KServe deployment mode; modelmesh: a Triton ServingRuntime and one InferenceService per model.",
    ),
    ingress_host: str = typer.Option("", help="Expose gRPC through an Ingress (L7) for this host."),
    ingress_class: str = typer.Option("nginx", help="IngressClass of --ingress-host."),
    loadtests: Path = typer.Option(Path("loadtests"), help="Folder of locustfiles for the locust ConfigMap."),
    locustfile: str = typer.Option("any_model.py", help="The locustfile the locust pods run."),
    batch_model: str = typer.Option("", help="Model of the batch Job (default: the first one)."),
    batch_input: str = typer.Option("", help="Input of the batch Job (default: /data/input)."),
    batch_output: str = typer.Option("", help="Output of the batch Job (default: /data/output)."),
    batch_shards: int = typer.Option(4, help="Parallel shards of the batch Job."),
    tune: Path | None = typer.Option(None, help="tune.json of `tritonforge tune`: instance counts, sizing."),
    sweep: Path | None = typer.Option(None, help="sweep.json of `tritonforge bench`, for --target-rps."),
    measure: str | None = typer.Option(None, help="Measure this model now (embedded server) for sizing."),
    concurrency: str = typer.Option("1:16", help="Concurrency levels of --measure (1,2,4 or 1:16)."),
    target_rps: float | None = typer.Option(None, help="Size prod replicas for this many requests/s."),
    max_p99_ms: float | None = typer.Option(None, help="Only levels within this p99 count as capacity."),
    utilisation: float = typer.Option(0.7, help="Share of a pod's measured capacity to plan for."),
    canary_steps: str = typer.Option(
        "", help="KServe canary plan: traffic percent per step, e.g. 5,25,50,100 (as `rollout --steps`)."
    ),
    canary_hold_s: int = typer.Option(300, help="Seconds each canary step is held and judged."),
    canary_max_error_rate: float = typer.Option(0.01, help="Canary plan: largest failed share of calls."),
    canary_max_mean_latency_ms: float | None = typer.Option(
        None, help="Canary plan: largest mean latency (ms)."
    ),
    canary_min_requests: int = typer.Option(100, help="Canary plan: calls needed before a step is judged."),
    restrict: list[str] = typer.Option(
        [],
        help="Restrict protocol groups to a header whose value is a Secret's key: "
        "GROUPS:HEADER=SECRET_NAME/KEY (repeatable; health stays open for the probes).",
    ),
    tls_secret: str = typer.Option("", help="kubernetes.io/tls Secret with gRPC's tls.crt, tls.key, ca.crt."),
    mtls: bool = typer.Option(False, "--mtls", help="Require client certificates (the Secret's ca.crt)."),
    client_tls_secret: str = typer.Option(
        "", help="With --mtls: kubernetes.io/tls Secret of the tool pods' client certificate."
    ),
    cache_max_models: int | None = CACHE_MAX_MODELS,
    cache_max_memory: str | None = CACHE_MAX_MEMORY,
    pin: list[str] = PIN,
    check: bool = typer.Option(True, help="Validate every generated object offline afterwards."),
) -> None:
    """Write Kubernetes (kustomize base + overlays, HPA/KEDA on Triton's metrics), KServe, locust,
    batch Job and compose manifests for REPO into OUT, with the repository as deployed and the
    Dockerfiles of the images they name, and check them offline. With a cache budget, every server pod
    runs the model cache (docs/many-models.md)."""
    from tritonforge.cache import cache_budget_from_options
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
    from tritonforge.deploy.spec import DEFAULT_IMAGE, default_store

    if replicas is not None:
        deprecated("--replicas", "--min-replicas (the HPA owns the scale; no replicas are written)")
    try:
        # the pods run Triton in explicit model control whenever there is a cache
        cache = cache_budget_from_options(cache_max_models, cache_max_memory, pin, "explicit")
        store = (
            parse_model_store(
                model_store,
                name=name,
                secret=credentials_secret,
                storage_class=storage_class,
                size=store_size,
            )
            if model_store
            else default_store(name, registry)
        )
        if storage_class and not model_store:
            raise DeployError("--storage-class is for pvc:// stores: give --model-store pvc://CLAIM too")
        metric_name = {
            Metric.queue_time: "queue_time",
            Metric.queue_ratio: "queue_ratio",
            Metric.gpu_utilization: "gpu_utilization",
        }[metric]
        spec = DeploySpec(
            name=name,
            image=image or DEFAULT_IMAGE,
            registry=registry,
            image_pull_secrets=tuple(image_pull_secret),
            store=store,
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            replicas=min_replicas,
            cpu_request=cpu,
            cpu_limit=_twice(cpu),
            memory_request=memory,
            memory_limit=_twice(memory),
            scratch_size=scratch_size,
            priority_class=priority_class,
            gpus=gpus,
            gpu_accelerator=gpu_accelerator.value,
            metric=metric_name,  # type: ignore[arg-type]
            target_queue_us=round(target_queue_ms * 1000),
            target_queue_ratio=target_queue_ratio,
            target_gpu_utilization=target_gpu_utilization,
            scale_down_window_s=scale_down_window_s,
            monitor_labels=_labels(monitor_label),
            monitoring_namespace=monitoring_namespace,
            dev_namespace=dev_namespace,
            prod_namespace=prod_namespace,
            workload_identity=workload_identity,
            kserve_mode={
                KServeMode.raw: "RawDeployment",
                KServeMode.serverless: "Serverless",
                KServeMode.modelmesh: "ModelMesh",
            }[kserve_mode],  # type: ignore[arg-type]
            ingress_host=ingress_host,
            ingress_class=ingress_class,
            locustfile=locustfile,
            batch_model=batch_model,
            batch_input=batch_input,
            batch_output=batch_output,
            batch_shards=batch_shards,
            prometheus_url=prometheus_url,
            canary_steps=parse_canary_steps(canary_steps) if canary_steps else (),
            canary_hold_s=canary_hold_s,
            restrictions=tuple(parse_restriction(r, index=i) for i, r in enumerate(restrict)),
            tls_secret=tls_secret,
            mtls=mtls,
            client_tls_secret=client_tls_secret,
            cache=cache,
        )
        thresholds: dict[str, float] = {
            "max_error_rate": canary_max_error_rate,
            "min_requests": canary_min_requests,
        }
        if canary_max_mean_latency_ms is not None:
            thresholds["max_mean_latency_ms"] = canary_max_mean_latency_ms
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
                data, source = _measure(repo, measure, concurrency)
                measured = (data, {}, source)
            if measured is None:
                raise DeployError(
                    "--target-rps needs a measured sweep: --sweep FILE, --tune FILE or --measure MODEL"
                )
            data, counts, source = measured
            sizing = size_for(
                target_rps,
                data,
                p99_budget_ms=max_p99_ms,
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
                allow_idle_gpus=allow_idle_gpus,
                force=force,
            )
        findings = check_tree(out) if check else []
    except (TritonForgeError, ValueError) as exc:
        raise _fail(exc if isinstance(exc, TritonForgeError) else DeployError(str(exc))) from None
    console.print(f"[bold]wrote {len(generated.files)} files into {out}[/] (+ repository/)", highlight=False)
    for file in generated.files:
        console.print(f"  {file}", highlight=False, soft_wrap=True, markup=False)
    if locustfiles is None:
        console.print(f"[yellow]no locust manifests:[/] {loadtests} is not a folder (give --loadtests)")
    if sizing is not None:
        console.print("[bold]Sizing[/]")
        for reason in sizing.reasons:
            console.print(f"  - {reason}", highlight=False, soft_wrap=True, markup=False)
        console.print(
            f"  => prod: {sizing.replicas} replicas, HPA {sizing.min_replicas}..{sizing.max_replicas}",
            highlight=False,
        )
    for note in generated.notes:
        console.print(Text.assemble(("note: ", "yellow"), note), highlight=False, soft_wrap=True)
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


#: old spellings, kept for one release (docs/cli-vocabulary.md lists them)
RENAMED = {
    "--prod-gpus": "--gpus",
    "--levels": "--concurrency",
    "--p99-budget-ms": "--max-p99-ms",
    "--canary-hold": "--canary-hold-s",
    "--canary-max-latency-ms": "--canary-max-mean-latency-ms",
}


def register(app: typer.Typer) -> None:
    app.command()(renamed(RENAMED)(deploy))
