"""The model registry: manifests per version, served versions (promote / rollback), an audit log."""

from tritonforge.registry.audit import AuditLog, current_user, read_audit_log, record_event
from tritonforge.registry.build import Step, build_key, find_built
from tritonforge.registry.core import (
    AUDIT_LOG,
    ModelVersion,
    audit_log,
    library_versions,
    list_models,
    promote,
    read_manifest,
    register,
    rollback,
    served_before,
    served_versions,
)

__all__ = [
    "AUDIT_LOG",
    "AuditLog",
    "ModelVersion",
    "Step",
    "audit_log",
    "build_key",
    "current_user",
    "find_built",
    "library_versions",
    "list_models",
    "promote",
    "read_audit_log",
    "read_manifest",
    "record_event",
    "register",
    "rollback",
    "served_before",
    "served_versions",
]
