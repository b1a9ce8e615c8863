"""The library records its own changes in the audit log (one writer, tritonforge.repository.audit): a
caller of the API leaves the same trail as the CLI, and register/promote each record exactly one line."""

from __future__ import annotations

import ast
import itertools
import threading
from pathlib import Path

import tiny_models
import tritonforge.registry.audit
from tritonforge.registry import audit_log, promote, register, rollback
from tritonforge.repository import add_model
from tritonforge.verify import Artifact, compare


def test_add_model_through_the_api_leaves_an_add_model_event(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model = tiny_models.mlp_onnx(tmp_path / "m.onnx")
    add_model(repo, "mlp", model, max_batch_size=4)
    add_model(repo, "mlp", model, max_batch_size=4)
    events = audit_log(repo)
    assert [(e["action"], e["model"], e["version"], e["file"]) for e in events] == [
        ("add-model", "mlp", 1, str(model)),
        ("add-model", "mlp", 2, str(model)),
    ]
    assert all(e["by"] and e["at"] for e in events)


def test_register_and_served_version_changes_record_one_line_each(tmp_path: Path) -> None:
    import numpy as np

    repo = tmp_path / "repo"
    model = tiny_models.mlp_onnx(tmp_path / "m.onnx")
    report = compare(np.zeros((2, 3), np.float32), np.zeros((2, 3), np.float32))
    for _ in range(2):
        register(
            repo, "clf", Artifact(model, "export", {"format": "onnx"}, {"probs": report}), max_batch_size=4
        )
    event = promote(repo, "clf", 1, reason="canary ok")
    rollback(repo, "clf", to=2)
    actions = [(e["action"], e.get("version"), e.get("to")) for e in audit_log(repo)]
    assert actions == [
        ("add-model", 1, None),
        ("add-model", 2, None),
        ("promote", None, [1]),
        ("rollback", None, [2]),
    ]
    assert audit_log(repo)[2] == event and event["from"] == [2] and event["reason"] == "canary ok"
    assert "passed" in audit_log(repo)[0] and "sha256" in audit_log(repo)[0]  # register's own figures


def test_promotes_from_many_threads_each_record_what_they_replaced(tmp_path: Path) -> None:
    """The config rewrite and its record happen under one lock: each event's "from" is the previous "to"."""
    repo = tmp_path / "repo"
    model = tiny_models.mlp_onnx(tmp_path / "m.onnx")
    for _ in range(3):
        add_model(repo, "mlp", model, max_batch_size=4)
    threads = [threading.Thread(target=promote, args=(repo, "mlp", 1 + i % 3)) for i in range(9)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    changes = [e for e in audit_log(repo) if e["action"] == "promote"]
    assert len(changes) == 9
    for before, after in itertools.pairwise(changes):
        assert after["from"] == before["to"]


def test_the_audit_writer_no_longer_imports_the_registry_core() -> None:
    tree = ast.parse(Path(tritonforge.registry.audit.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert "tritonforge.registry.core" not in modules
