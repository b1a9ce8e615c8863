"""The tritonforge client: sync and asyncio gRPC clients that orchestrate models across Triton servers.

Retries, fallbacks, routing (A/B, canary), shadow traffic, endpoint pools with circuit breakers, shared
memory and metrics, with the same methods on :class:`Client` and :class:`AsyncClient`::

    from tritonforge.client import AsyncClient, Fallback, TrafficSplit

    async with AsyncClient(["10.0.0.5:8001", "10.0.0.6:8001"],
                           routes={"clf": TrafficSplit.canary("clf", stable="1", candidate="2", share=0.1)},
                           fallbacks={"clf": Fallback("clf_small")}) as client:
        out = await client.infer("clf", {"x": batch})

A ``dns:///name:port`` URL (a Kubernetes headless Service) stands for every replica behind the name,
re-resolved in the background (:class:`Discovery`).

Errors are those of :mod:`tritonforge.errors` (``ClientError`` and below), mapped in one place
(:func:`map_grpc_errors`).
"""

from __future__ import annotations

from tritonforge.client._async import AsyncClient
from tritonforge.client._base import DEFAULT_CONTROL_TIMEOUT_S, InferOptions, ManyOptions
from tritonforge.client._codec import ModelMetadata, TensorMetadata
from tritonforge.client._discovery import Discovery, DnsTarget
from tritonforge.client._mapping import map_grpc_errors
from tritonforge.client._pool import Capabilities, EndpointStatus
from tritonforge.client._sync import Client
from tritonforge.client.observe import ClientEvent, ShadowStats
from tritonforge.client.policies import (
    DEFAULT_DEADLINE,
    DEFAULT_RETRY,
    PROTOCOL_GROUPS,
    Auth,
    CircuitBreaker,
    Coalesce,
    Deadline,
    Fallback,
    HealthCheck,
    Placement,
    RetryBudget,
    RetryPolicy,
    Shadow,
    SharedMemory,
    TLSConfig,
    TrafficSplit,
    Variant,
)

__all__ = [
    "DEFAULT_CONTROL_TIMEOUT_S",
    "DEFAULT_DEADLINE",
    "DEFAULT_RETRY",
    "PROTOCOL_GROUPS",
    "AsyncClient",
    "Auth",
    "Capabilities",
    "CircuitBreaker",
    "Client",
    "ClientEvent",
    "Coalesce",
    "Deadline",
    "Discovery",
    "DnsTarget",
    "EndpointStatus",
    "Fallback",
    "HealthCheck",
    "InferOptions",
    "ManyOptions",
    "ModelMetadata",
    "Placement",
    "RetryBudget",
    "RetryPolicy",
    "Shadow",
    "ShadowStats",
    "SharedMemory",
    "TLSConfig",
    "TensorMetadata",
    "TrafficSplit",
    "Variant",
    "map_grpc_errors",
]
