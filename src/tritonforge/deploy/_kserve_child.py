"""Runs the ``kserve`` SDK in its own interpreter (started by :mod:`tritonforge.deploy.extras`).

Why a separate process: kserve's generated protobuf module registers the KServe v2 gRPC messages
(``inference.ServerLiveRequest``, ...) in protobuf's default pool, and ``tritonclient.grpc`` registers the
very same names; whichever is imported second fails with "duplicate symbol". So this script never imports
tritonforge or tritonclient. It reads one JSON request on stdin and writes one JSON answer on stdout:

- ``{"op": "build", "plan": {...}}`` -> ``{"object": <InferenceService as a dict>}``
- ``{"op": "canary", "name": ..., "steps": [5, ...]}`` -> ``{"object": {"objects": [<patches>, <rollback>]}}``
- ``{"op": "check", "object": {...}}`` -> ``{"object": <the object read into the SDK's models and back>}``
- ``{"op": "check_many", "objects": [...]}`` -> ``{"object": {"objects": [<each read and back, or
  {"error": message}>]}}``: an InferenceService or a ServingRuntime each, in one interpreter
- ``{"op": "modelmesh", "runtime": {...}, "services": [{...}, ...]}`` -> ``{"object": {"objects":
  [<ServingRuntime>, <InferenceService per model in ModelMesh mode>]}}``
"""

from __future__ import annotations

import json
import sys
from typing import Any


def _metadata(plan: dict[str, Any]) -> Any:
    from kubernetes.client import V1ObjectMeta

    return V1ObjectMeta(
        name=plan["name"],
        namespace=plan.get("namespace"),
        labels=plan.get("labels"),
        annotations=plan.get("annotations"),
    )


def _inference_service(plan: dict[str, Any], predictor: Any) -> Any:
    from kserve import constants
    from kserve.models import V1beta1InferenceService, V1beta1InferenceServiceSpec

    return V1beta1InferenceService(
        api_version=constants.KSERVE_V1BETA1,
        kind="InferenceService",
        metadata=_metadata(plan),
        spec=V1beta1InferenceServiceSpec(predictor=predictor),
    )


def build(plan: dict[str, Any]) -> Any:
    from kserve.models import V1beta1ModelFormat, V1beta1ModelSpec, V1beta1PredictorSpec
    from kubernetes.client import V1ResourceRequirements

    model = V1beta1ModelSpec(
        model_format=V1beta1ModelFormat(name="triton"),
        runtime=plan["runtime"],
        runtime_version=plan["runtime_version"],
        storage_uri=plan["storage_uri"],
        name="kserve-container",
        protocol_version="v2",
        args=plan["args"],
        resources=V1ResourceRequirements(**plan["resources"]),
        env=load(plan.get("env") or None, "list[V1EnvVar]"),
        image=plan.get("image"),
        volume_mounts=load(plan.get("volume_mounts") or None, "list[V1VolumeMount]"),
        readiness_probe=load(plan.get("readiness_probe"), "V1Probe"),
    )
    return _inference_service(
        plan,
        V1beta1PredictorSpec(
            model=model,
            min_replicas=plan["min_replicas"],
            max_replicas=plan["max_replicas"],
            canary_traffic_percent=plan.get("canary_traffic_percent"),
            service_account_name=plan.get("service_account"),
            volumes=load(plan.get("volumes") or None, "list[V1Volume]"),
        ),
    )


_PRIMITIVES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "object": (object,),
}


def load(data: Any, kind: str) -> Any:
    """``data`` read into the SDK's model classes (kserve's, and Kubernetes' that they nest). kserve writes
    ``list[X]`` / ``dict(str, X)``, the Kubernetes client ``List[X]`` / ``Dict[str, X]``: both are read.
    A class's constructor checks its required fields; a key the class doesn't map is dropped, which the
    caller sees as a difference on the way back."""
    import re

    import kserve.models
    import kubernetes.client.models as core

    if data is None:
        return None
    found = re.fullmatch(r"(?:list|List)\[(.*)\]", kind)
    if found:
        if not isinstance(data, list):
            raise TypeError(f"expected a list for {kind}, got {data!r}")
        return [load(item, found.group(1)) for item in data]
    found = re.fullmatch(r"dict\([^,]*, (.*)\)|Dict\[[^,]*, (.*)\]", kind)
    if found:
        if not isinstance(data, dict):
            raise TypeError(f"expected a mapping for {kind}, got {data!r}")
        inner = found.group(1) or found.group(2)
        return {key: load(value, inner) for key, value in data.items()}
    if kind in _PRIMITIVES:
        if not isinstance(data, _PRIMITIVES[kind]) or (kind == "int" and isinstance(data, bool)):
            raise TypeError(f"expected {kind}, got {data!r}")
        return data
    cls = getattr(kserve.models, kind, None) or getattr(core, kind)
    if not isinstance(data, dict):
        raise TypeError(f"expected a {kind} mapping, got {data!r}")
    kwargs = {
        attr: load(data[key], cls.openapi_types[attr])
        for attr, key in cls.attribute_map.items()
        if key in data
    }
    return cls(**kwargs)


def canary(name: str, steps: list[int]) -> list[Any]:
    """One InferenceService patch per step (then one with 0: the rollback), only canaryTrafficPercent."""
    from kserve.models import V1beta1PredictorSpec

    return [
        _inference_service({"name": name}, V1beta1PredictorSpec(canary_traffic_percent=percent))
        for percent in [*steps, 0]
    ]


def serving_runtime(plan: dict[str, Any]) -> Any:
    """A namespaced ServingRuntime for Triton behind ModelMesh's built-in adapter (the plan names it all)."""
    from kserve import constants
    from kserve.models import (
        V1alpha1BuiltInAdapter,
        V1alpha1ServingRuntime,
        V1alpha1ServingRuntimeSpec,
        V1alpha1SupportedModelFormat,
    )

    return V1alpha1ServingRuntime(
        api_version=constants.KSERVE_V1ALPHA1,
        kind="ServingRuntime",
        metadata=_metadata(plan),
        spec=V1alpha1ServingRuntimeSpec(
            supported_model_formats=[V1alpha1SupportedModelFormat(**f) for f in plan["formats"]],
            protocol_versions=["grpc-v2"],
            multi_model=True,
            grpc_endpoint=plan["grpc_endpoint"],
            grpc_data_endpoint=plan["grpc_data_endpoint"],
            replicas=plan["replicas"],
            containers=load(plan["containers"], "list[V1Container]"),
            built_in_adapter=V1alpha1BuiltInAdapter(**plan["adapter"]),
            image_pull_secrets=load(plan.get("image_pull_secrets") or None, "list[V1LocalObjectReference]"),
            node_selector=plan.get("node_selector") or None,
            tolerations=load(plan.get("tolerations") or None, "list[V1Toleration]"),
        ),
    )


def mesh_service(plan: dict[str, Any]) -> Any:
    """One model as an InferenceService in ModelMesh mode: its format, the runtime, where it is stored."""
    from kserve.models import (
        V1beta1ModelFormat,
        V1beta1ModelSpec,
        V1beta1ModelStorageSpec,
        V1beta1PredictorSpec,
    )

    storage = plan.get("storage")
    model = V1beta1ModelSpec(
        model_format=V1beta1ModelFormat(name=plan["format"]),
        runtime=plan["runtime"],
        storage=V1beta1ModelStorageSpec(
            key=storage.get("key"), path=storage["path"], parameters=storage.get("parameters")
        )
        if storage
        else None,
        storage_uri=plan.get("storageUri"),
    )
    return _inference_service(plan, V1beta1PredictorSpec(model=model))


def _checked(data: Any) -> Any:
    kind = "V1alpha1ServingRuntime" if data.get("kind") == "ServingRuntime" else "V1beta1InferenceService"
    return load(data, kind)


def main() -> None:
    request = json.load(sys.stdin)
    from kserve import ApiClient

    client = ApiClient()
    if request["op"] == "canary":
        objects = canary(request["name"], request["steps"])
        json.dump(
            {"object": {"objects": [client.sanitize_for_serialization(o) for o in objects]}}, sys.stdout
        )
        return
    if request["op"] == "modelmesh":
        objects = [serving_runtime(request["runtime"]), *map(mesh_service, request["services"])]
        json.dump(
            {"object": {"objects": [client.sanitize_for_serialization(o) for o in objects]}}, sys.stdout
        )
        return
    if request["op"] == "check_many":
        answers = []
        for data in request["objects"]:
            try:
                answers.append(client.sanitize_for_serialization(_checked(data)))
            except (TypeError, ValueError, KeyError) as exc:
                answers.append({"error": f"{type(exc).__name__}: {exc}"})
        json.dump({"object": {"objects": answers}}, sys.stdout)
        return
    obj = build(request["plan"]) if request["op"] == "build" else _checked(request["object"])
    json.dump({"object": client.sanitize_for_serialization(obj)}, sys.stdout)


if __name__ == "__main__":
    main()
