"""The live check of a repository: load each model in a real server, one at a time, and send it one request.

It sits above both the server and the repository's offline checks (it drives the one with the other).
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tritonforge.errors import ModelLoadError, TritonForgeError
from tritonforge.repository.checker import model_dirs, sample_inputs
from tritonforge.server.embedded import EmbeddedServer
from tritonforge.server.probe import fetch_config, infer_once

__all__ = ["LiveResult", "check_live"]


@dataclass
class LiveResult:
    """What happened to one model on a live server: loaded?, answered?, in how long."""

    model: str
    loaded: bool
    answered: bool = False
    latency_ms: float | None = None
    outputs: dict[str, tuple[int, ...]] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.loaded and self.answered


def check_live(
    repo: str | os.PathLike[str], *, timeout_s: float = 60.0, server: Any = None
) -> list[LiveResult]:
    """Load each model of ``repo`` in the embedded server, one at a time, and send it one request.

    A model that fails to load is reported with Triton's reason; the others are still tried. Each model
    (and the composing models an ensemble brought in) is unloaded once checked unless it was loaded
    before, so a repository of 500 models holds one model's processes at a time, not 500, and a
    ``server`` given (explicit model control) is left with the models it had.
    """
    import tritonclient.grpc as grpcclient

    root = Path(repo)
    own = server is None
    if own:
        server = EmbeddedServer(root, model_control="explicit")
        server.start()
    results: list[LiveResult] = []
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        for model_dir in model_dirs(root):
            name = model_dir.name
            brought = [m for m in _loaded_with(root, name) if not server.is_model_ready(m)]
            try:
                server.load_model(name)
            except (ModelLoadError, TritonForgeError) as exc:
                results.append(LiveResult(name, loaded=False, error=exc.message))
                _unload(server, brought)
                continue
            result = LiveResult(name, loaded=True)
            try:
                # The server's config: auto-completed inputs and outputs included.
                config = fetch_config(client, name, timeout_s=timeout_s)
                arrays = sample_inputs(config)
                start = time.perf_counter()
                outputs = infer_once(client, name, config, arrays, timeout_s=timeout_s)
                result.latency_ms = (time.perf_counter() - start) * 1e3
                for tensor in config.outputs:
                    value = outputs.get(tensor.name)
                    if value is None:
                        if config.decoupled:  # a decoupled model may answer with fewer outputs
                            continue
                        raise TritonForgeError(f"the response has no output '{tensor.name}'")
                    result.outputs[tensor.name] = tuple(value.shape)
                result.answered = True
            except Exception as exc:  # report, don't stop: the point is to see every model's state
                result.error = exc.message if isinstance(exc, TritonForgeError) else str(exc)
            results.append(result)
            _unload(server, brought)
    finally:
        client.close()
        if own:
            server.stop()
    return results


def _unload(server: Any, models: list[str]) -> None:
    for model in models:
        with contextlib.suppress(TritonForgeError):  # its state is reported already
            server.unload_model(model)


def _loaded_with(root: Path, name: str) -> list[str]:
    """``name`` and the models Triton loads with it: an ensemble's composing models, theirs in turn (from
    the repository's configs, as Triton reads them)."""
    from tritonforge.config import ComposingWalk, read_config

    walk = ComposingWalk(name)
    for model in walk:
        with contextlib.suppress(TritonForgeError, OSError):  # a model the repository lacks: Triton says so
            walk.add(
                step.model_name for step in read_config(root / model / "config.pbtxt").ensemble_steps or ()
            )
    return list(walk.found)
