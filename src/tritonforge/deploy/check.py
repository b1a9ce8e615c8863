"""Offline checks of a generated tree, the way a cluster would judge it (no cluster needed).

- core Kubernetes objects: ``kubernetes-validate`` against the schemas of ``KUBERNETES_VERSION``, strict
  (an unknown field is an error, as ``kubectl apply --validate=strict`` makes it);
- the overlays: their JSON patches applied to the base (RFC 6902, the ``jsonpatch`` library), the
  results validated like the base;
- KServe's InferenceService and ServingRuntime: read into the ``kserve`` SDK's models and written back
  unchanged (a field the SDK doesn't know would be dropped, so it shows as a difference), all of a tree in
  one interpreter; a ServingRuntime also against the fields of its CRD (:data:`CRD_FIELDS`) and its
  containers, tolerations and pull secrets against the Kubernetes Pod schema; a ModelMesh-mode
  InferenceService must name a ServingRuntime of the tree that declares its model format;
- ServiceMonitor and KEDA ScaledObject (CRDs, no upstream schema offline): the fields we write must be
  ones those CRDs define, with the types they define (:data:`CRD_FIELDS`);
- every kustomization's resources exist.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from tritonforge.errors import DeployError
from tritonforge.files import read_yaml

__all__ = ["KUBERNETES_VERSION", "Finding", "check_tree", "validate_object"]

MESH_ANNOTATION = "serving.kserve.io/deploymentMode"
#: the Kubernetes version whose schemas the objects must satisfy
KUBERNETES_VERSION = "1.31.0"

# The fields of the CRDs we write (prometheus-operator monitoring.coreos.com/v1, KEDA keda.sh/v1alpha1),
# as JSON schema: enough to catch a misspelt or misplaced field, not the whole CRD.
_STR = {"type": "string"}
_INT = {"type": "integer"}
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_META = {
    "type": "object",
    "required": ["name"],
    "properties": {"name": _STR, "namespace": _STR, "labels": _LABELS, "annotations": _LABELS},
    "additionalProperties": False,
}
_SELECTOR = {"type": "object", "properties": {"matchLabels": _LABELS}, "additionalProperties": False}
_DURATION = {"type": "string", "pattern": "^(0|(([0-9]+)(h|m|s|ms))+)$"}


def _resource(spec: dict[str, Any]) -> dict[str, Any]:
    """The schema of a whole object of one kind: the Kubernetes envelope around its ``spec`` schema."""
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {"apiVersion": _STR, "kind": _STR, "metadata": _META, "spec": spec},
        "additionalProperties": False,
    }


def _endpoints(**more: dict[str, Any]) -> dict[str, Any]:
    """A ServiceMonitor's ``endpoints`` / a PodMonitor's ``podMetricsEndpoints``: the fields we write."""
    fields = {"port": _STR, "path": _STR, "interval": _DURATION, "scrapeTimeout": _DURATION, **more}
    return {
        "type": "array",
        "items": {"type": "object", "additionalProperties": False, "properties": fields},
    }


_PORT_ENDPOINT = {"type": "string", "pattern": "^port:[0-9]{1,5}$"}
_SERVING_RUNTIME = _resource(
    {
        "type": "object",
        "required": ["containers"],
        "additionalProperties": False,
        "properties": {
            "supportedModelFormats": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "additionalProperties": False,
                    "properties": {
                        "name": _STR,
                        "version": _STR,
                        "autoSelect": {"type": "boolean"},
                        "priority": {"type": "integer", "minimum": 1},
                    },
                },
            },
            "protocolVersions": {"type": "array", "items": {"enum": ["grpc-v1", "grpc-v2", "v1", "v2"]}},
            "multiModel": {"type": "boolean"},
            "grpcEndpoint": _PORT_ENDPOINT,
            "grpcDataEndpoint": _PORT_ENDPOINT,
            "httpDataEndpoint": _PORT_ENDPOINT,
            "replicas": {"type": "integer", "minimum": 0},
            # the Pod's own types: checked against the Kubernetes schema (_pod_probe)
            "containers": {"type": "array", "minItems": 1, "items": {"type": "object"}},
            "imagePullSecrets": {"type": "array"},
            "nodeSelector": _LABELS,
            "tolerations": {"type": "array"},
            "builtInAdapter": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "serverType": {"enum": ["triton", "mlserver", "ovms", "torchserve"]},
                    "runtimeManagementPort": {"type": "integer", "minimum": 1, "maximum": 65535},
                    "memBufferBytes": {"type": "integer", "minimum": 0},
                    "modelLoadingTimeoutMillis": {"type": "integer", "minimum": 1},
                    "env": {"type": "array"},
                },
            },
        },
    }
)
#: the storage ``type`` parameters KServe's admission webhook lets through (None: no type given)
_STORAGE_TYPES = {None, "s3", "hdfs", "webhdfs"}
#: the kinds the kserve SDK checks (read into its models and written back)
_KSERVE_KINDS = {
    ("serving.kserve.io/v1beta1", "InferenceService"),
    ("serving.kserve.io/v1alpha1", "ServingRuntime"),
}

CRD_FIELDS: dict[tuple[str, str], dict[str, Any]] = {
    # kserve/modelmesh-serving's serving.kserve.io_servingruntimes CRD: the fields we write
    ("serving.kserve.io/v1alpha1", "ServingRuntime"): _SERVING_RUNTIME,
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _resource(
        {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                "endpoints": _endpoints(),
            },
        }
    ),
    ("monitoring.coreos.com/v1", "PodMonitor"): _resource(
        {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _SELECTOR,
                # prometheus-operator's int-or-string; a number for KServe's unnamed port
                "podMetricsEndpoints": _endpoints(targetPort={"type": ["integer", "string"]}),
            },
        }
    ),
    ("keda.sh/v1alpha1", "ScaledObject"): _resource(
        {
            "type": "object",
            "required": ["scaleTargetRef", "triggers"],
            "additionalProperties": False,
            "properties": {
                "scaleTargetRef": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"apiVersion": _STR, "kind": _STR, "name": _STR},
                    "additionalProperties": False,
                },
                "minReplicaCount": _INT,
                "maxReplicaCount": _INT,
                "pollingInterval": _INT,
                "cooldownPeriod": _INT,
                "advanced": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        # KEDA passes this to the HPA it creates: checked below as HPA behavior
                        "horizontalPodAutoscalerConfig": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"name": _STR, "behavior": {"type": "object"}},
                        },
                        "restoreToOriginalReplicaCount": {"type": "boolean"},
                    },
                },
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "required": ["type", "metadata"],
                        "additionalProperties": False,
                        "properties": {
                            "type": {"enum": ["prometheus"]},
                            "metricType": {"enum": ["AverageValue", "Value", "Utilization"]},
                            "name": _STR,
                            # KEDA's prometheus scaler: every metadata value is a string
                            "metadata": {
                                "type": "object",
                                "required": ["serverAddress", "query", "threshold"],
                                "additionalProperties": False,
                                "properties": {
                                    k: _STR
                                    for k in (
                                        "serverAddress",
                                        "query",
                                        "threshold",
                                        "activationThreshold",
                                        "ignoreNullValues",
                                        "namespace",
                                    )
                                },
                            },
                        },
                    },
                },
            },
        }
    ),
}


@dataclasses.dataclass(frozen=True)
class Finding:
    """One object checked: where it is, what it is, how it was checked, and the problem (None: valid)."""

    file: str
    kind: str
    name: str
    how: str
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return self.problem is None


def _import_validator() -> Any:
    try:
        import kubernetes_validate
    except ImportError as exc:
        raise DeployError(
            "checking manifests needs kubernetes-validate: pip install 'tritonforge[deploy]'"
        ) from exc
    return kubernetes_validate


def validate_object(obj: dict[str, Any], version: str = KUBERNETES_VERSION) -> tuple[str, str | None]:
    """How ``obj`` was checked and its problem (None when valid).

    Raises:
        DeployError: the validator is not installed.
    """
    return _validate(obj, version, lambda o: _kserve_problems([o])[0])


def _validate(
    obj: dict[str, Any], version: str, sdk_problem: Callable[[dict[str, Any]], str | None]
) -> tuple[str, str | None]:
    kv = _import_validator()
    kind = (obj.get("apiVersion", ""), obj.get("kind", ""))
    if kind == ("serving.kserve.io/v1alpha1", "ServingRuntime"):
        return _serving_runtime_problem(obj, version, kv, sdk_problem)
    if kind in CRD_FIELDS:
        import jsonschema

        errors = sorted(jsonschema.Draft7Validator(CRD_FIELDS[kind]).iter_errors(obj), key=str)
        if kind[1] == "ScaledObject" and not errors:
            behavior = (
                obj["spec"].get("advanced", {}).get("horizontalPodAutoscalerConfig", {}).get("behavior")
            )
            if behavior is not None:
                probe = _hpa_probe(obj, behavior)
                try:
                    kv.validate(probe, version, strict=True)
                except kv.ValidationError as exc:
                    return "CRD fields + HPA behavior", f"behavior: {exc.message}"
        how = "CRD fields"
        if errors:
            first = errors[0]
            return how, f"{'/'.join(map(str, first.absolute_path))}: {first.message}"
        return how, None
    if kind == ("serving.kserve.io/v1beta1", "InferenceService"):
        return "kserve SDK models", sdk_problem(obj)
    try:
        kv.validate(obj, version, strict=True)
    except kv.SchemaNotFoundError:
        return "none", f"no schema for {kind[0]} {kind[1]} in Kubernetes {version} or our CRD list"
    except kv.ValidationError as exc:
        where = "/".join(str(p) for p in exc.path)
        return f"Kubernetes {version} schema", f"{where}: {exc.message}"
    return f"Kubernetes {version} schema", None


def _hpa_probe(obj: dict[str, Any], behavior: Any) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": obj["metadata"]["name"]},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": "x"},
            "maxReplicas": 1,
            "behavior": behavior,
        },
    }


def _serving_runtime_problem(
    obj: dict[str, Any], version: str, kv: Any, sdk_problem: Callable[[dict[str, Any]], str | None]
) -> tuple[str, str | None]:
    import jsonschema

    how = "CRD fields + Pod schema + kserve SDK models"
    errors = sorted(jsonschema.Draft7Validator(_SERVING_RUNTIME).iter_errors(obj), key=str)
    if errors:
        return how, f"{'/'.join(map(str, errors[0].absolute_path))}: {errors[0].message}"
    spec = obj["spec"]
    pod_fields = ("containers", "imagePullSecrets", "nodeSelector", "tolerations")
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": obj["metadata"]["name"]},
        "spec": {k: spec[k] for k in pod_fields if k in spec},
    }
    try:
        kv.validate(probe, version, strict=True)
    except kv.ValidationError as exc:
        return how, f"{'/'.join(str(p) for p in exc.path)} (as a Pod's): {exc.message}"
    return how, _mesh_runtime_problem(spec) or sdk_problem(obj)


def _mesh_runtime_problem(spec: dict[str, Any]) -> str | None:
    """What ModelMesh's controller refuses in a runtime: no container named as its adapter's server type,
    probes or hooks it manages itself, container names it reserves."""
    names = [c.get("name", "") for c in spec["containers"]]
    server_type = (spec.get("builtInAdapter") or {}).get("serverType")
    if server_type and server_type not in names:
        return f"ModelMesh needs a container named {server_type!r} (the adapter's serverType), not {names}"
    for container in spec["containers"]:
        if "readinessProbe" in container or "lifecycle" in container:
            return f"container {container['name']!r}: ModelMesh manages readinessProbe and lifecycle itself"
        if container["name"] in ("mm", "rest-proxy", "puller") or container["name"].startswith("mm-"):
            return f"container name {container['name']!r} is reserved by ModelMesh"
    return None


def _kserve_problems(objs: list[dict[str, Any]]) -> list[str | None]:
    """Each object read into the kserve SDK's models and back (one interpreter for all): its problem."""
    from tritonforge.deploy.extras import kserve_sdk

    if not objs:
        return []
    try:
        answers = kserve_sdk({"op": "check_many", "objects": objs})["objects"]
    except DeployError as exc:
        return [exc.message] * len(objs)
    problems: list[str | None] = []
    for obj, back in zip(objs, answers, strict=True):
        if "error" in back and "error" not in obj:
            problems.append(f"the kserve SDK refused it: {back['error']}")
        elif back != obj:
            problems.append(f"fields the kserve SDK doesn't know: {sorted(_diff(obj, back))}")
        else:
            problems.append(None)
    return problems


def _mesh_problems(docs: list[tuple[str, dict[str, Any]]]) -> dict[int, str]:
    """ModelMesh-mode InferenceServices whose runtime is not in the tree or lacks their model format."""
    formats = {
        d["metadata"]["name"]: {f.get("name") for f in d["spec"].get("supportedModelFormats", [])}
        for _, d in docs
        if d.get("kind") == "ServingRuntime"
    }
    problems: dict[int, str] = {}
    for _, doc in docs:
        annotations = doc.get("metadata", {}).get("annotations") or {}
        if doc.get("kind") != "InferenceService" or annotations.get(MESH_ANNOTATION) != "ModelMesh":
            continue
        model = doc.get("spec", {}).get("predictor", {}).get("model", {})
        runtime, fmt = model.get("runtime"), (model.get("modelFormat") or {}).get("name")
        if runtime not in formats:
            problems[id(doc)] = f"runtime {runtime!r} is no ServingRuntime of this tree"
        elif fmt not in formats[runtime]:
            problems[id(doc)] = f"runtime {runtime!r} declares no model format {fmt!r}"
        elif "storageUri" in model and "path" in (model.get("storage") or {}):
            problems[id(doc)] = "ModelMesh refuses both storageUri and storage.path"
        elif "storageUri" not in model and "path" not in (model.get("storage") or {}):
            problems[id(doc)] = "ModelMesh needs storageUri or storage.path"
        elif (
            kind := ((model.get("storage") or {}).get("parameters") or {}).get("type")
        ) not in _STORAGE_TYPES:
            problems[id(doc)] = (
                f"KServe's admission webhook refuses storage type {kind!r} (only s3, hdfs, webhdfs); "
                "give a PVC as storageUri pvc://CLAIM/PATH"
            )
    return problems


def _diff(a: Any, b: Any, path: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for key in set(a) | set(b):
            out |= _diff(a.get(key), b.get(key), f"{path}/{key}")
        return out
    return set() if a == b else {path or "/"}


def _docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in read_yaml(path, what="manifest", error=DeployError, every=True) if d]


def check_tree(out: str | Path, version: str = KUBERNETES_VERSION) -> list[Finding]:
    """Check every manifest under ``out`` (a ``tritonforge deploy`` tree); one finding per object.

    Raises:
        DeployError: the validator is not installed, or ``out`` is no generated tree.
    """
    import jsonpatch

    root = Path(out)
    if not (root / "base" / "kustomization.yaml").is_file():
        raise DeployError(f"{root} is not a `tritonforge deploy` output (no base/kustomization.yaml)")
    findings: list[Finding] = []
    skip = {"docker-compose.yaml", "prometheus-adapter-values.yaml"}
    docs: list[tuple[str, dict[str, Any]]] = []
    for path in sorted(root.rglob("*.yaml")):
        rel = str(path.relative_to(root))
        if path.name in skip or rel.startswith("repository/"):  # the model repository's own files
            continue
        for doc in _docs(path):
            if path.name == "kustomization.yaml":
                findings.append(_check_kustomization(path, rel, doc))
            else:
                docs.append((rel, doc))
    # one kserve SDK interpreter for every KServe object of the tree (one per model in ModelMesh mode)
    kserve = [d for _, d in docs if (d.get("apiVersion"), d.get("kind")) in _KSERVE_KINDS]
    sdk = {id(d): p for d, p in zip(kserve, _kserve_problems(kserve), strict=True)}
    mesh = _mesh_problems(docs)
    for rel, doc in docs:
        how, problem = _validate(doc, version, lambda o: sdk[id(o)])
        findings.append(_finding(rel, doc, how, problem or mesh.get(id(doc))))
    base = [d for p in (root / "base").glob("*.yaml") if p.name != "kustomization.yaml" for d in _docs(p)]
    for overlay in sorted((root / "overlays").iterdir()):
        findings.extend(_check_overlay(overlay, root, base, version, jsonpatch))
    findings.extend(_check_compose(root))
    return findings


def _finding(rel: str, doc: dict[str, Any], how: str, problem: str | None) -> Finding:
    return Finding(rel, str(doc.get("kind")), str(doc.get("metadata", {}).get("name")), how, problem)


def _check_kustomization(path: Path, rel: str, doc: dict[str, Any]) -> Finding:
    missing = [r for r in doc.get("resources", []) if not (path.parent / r).exists()]
    problem = f"resources not found: {missing}" if missing else None
    return Finding(rel, "Kustomization", path.parent.name, "resources exist", problem)


def _check_overlay(
    overlay: Path, root: Path, base: Iterable[dict[str, Any]], version: str, jsonpatch: Any
) -> list[Finding]:
    kustomization = read_yaml(overlay / "kustomization.yaml", what="kustomization", error=DeployError)
    namespace = kustomization.get("namespace")
    rendered = []
    for obj in base:
        obj = copy.deepcopy(obj)
        for patch in kustomization.get("patches", []):
            target = patch["target"]
            if obj["kind"] == target["kind"] and obj["metadata"]["name"] == target["name"]:
                obj = jsonpatch.apply_patch(obj, json.loads(patch["patch"]))
        if namespace:
            obj["metadata"]["namespace"] = namespace
        rendered.append(obj)
    rel = str(overlay.relative_to(root))
    out = []
    for obj in rendered:
        how, problem = validate_object(obj, version)
        out.append(_finding(f"{rel} (base + patches)", obj, how, problem))
    return out


def _check_compose(root: Path) -> list[Finding]:
    path = root / "compose" / "docker-compose.yaml"
    if not path.is_file():
        return []
    doc = read_yaml(path, what="compose file", error=DeployError)
    service = doc.get("services", {}).get("triton", {})
    problems = [k for k in ("image", "command", "healthcheck", "volumes") if k not in service]
    source = (path.parent / service.get("volumes", [{}])[0].get("source", "")).resolve()
    if not (source / ".").is_dir():
        problems.append(f"the bind-mounted repository {source} does not exist")
    problem = f"missing or wrong: {problems}" if problems else None
    return [Finding("compose/docker-compose.yaml", "compose", "triton", "structure", problem)]
