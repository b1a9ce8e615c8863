"""Images that exist: every image a generated manifest names is NVIDIA's, or built by a Dockerfile written
beside the manifests and tagged with the package version (never ``:latest``, which is always pulled and
names nothing in particular).

- ``server``: ``FROM`` NVIDIA's Triton tag, plus the pinned pip requirements the Python models import
  beyond what that image has (written only when there are some; otherwise NVIDIA's image is used as is);
- ``models``: the deployed repository in a small image, copied by an init container into the pod;
- ``tools``: tritonforge with its load-test and batch extras, for the locust pods and the batch Job.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from tritonforge import __version__

__all__ = [
    "COPY_IMAGE_BASE",
    "TOOLS_IMAGE_BASE",
    "ImageSet",
    "image_set",
    "models_dockerfile",
    "server_dockerfile",
    "tools_dockerfile",
]

#: the models image's base: a shell-less copy needs only ``cp`` (busybox, pinned)
COPY_IMAGE_BASE = "busybox:1.36.1"
#: the tools image's base: the Python the package supports, pinned to a minor release and Debian
TOOLS_IMAGE_BASE = "python:3.11-slim-bookworm"
#: where the models image carries the repository (the init container copies it from here)
MODELS_IMAGE_PATH = "/models"


@dataclasses.dataclass(frozen=True)
class ImageSet:
    """The images of one deployment: ``server`` (Triton), ``models`` (the repository), ``tools``."""

    server: str
    models: str
    tools: str
    #: whether ``server`` is built here (requirements beyond NVIDIA's image) or is NVIDIA's own
    server_built: bool


def _ref(registry: str, name: str) -> str:
    return f"{registry.rstrip('/')}/{name}:{__version__}" if registry else f"{name}:{__version__}"


def image_set(
    name: str, *, base_image: str, registry: str, requirements: Mapping[str, Sequence[str]]
) -> ImageSet:
    """The images for deployment ``name``: NVIDIA's ``base_image`` unless the models need more."""
    built = any(requirements.values())
    return ImageSet(
        server=_ref(registry, f"{name}-triton") if built else base_image,
        models=_ref(registry, f"{name}-models"),
        tools=_ref(registry, "tritonforge-tools"),
        server_built=built,
    )


def requirement_lines(requirements: Mapping[str, Sequence[str]]) -> list[str]:
    """One pinned line per package, each saying which models need it."""
    users: dict[str, list[str]] = {}
    for model, lines in sorted(requirements.items()):
        for line in lines:
            users.setdefault(line, []).append(model)
    return [f"{line}  # {', '.join(models)}" for line, models in sorted(users.items())]


def server_dockerfile(base_image: str, tag: str) -> str:
    return (
        "# The server image: NVIDIA's Triton with the pinned packages the Python models import beyond it\n"
        "# (requirements.txt, one line per package, naming the models that need it). Build and push:\n"
        f"#   docker build -t {tag} images/server && docker push {tag}\n"
        f"FROM {base_image}\n"
        "COPY requirements.txt /opt/tritonforge/requirements.txt\n"
        "# the Python backend's stub runs the image's python3: install into it\n"
        "RUN python3 -m pip install --no-cache-dir --requirement /opt/tritonforge/requirements.txt\n"
        "# NVIDIA's image runs as root by default; its triton-server user is uid 1000\n"
        "USER 1000\n"
    )


def models_dockerfile(tag: str) -> str:
    return (
        "# The models image: the deployed repository (repository/ beside images/), copied into the pod's\n"
        "# emptyDir by the init container. Build from the deploy output folder and push:\n"
        f"#   docker build -f images/models/Dockerfile -t {tag} . && docker push {tag}\n"
        f"FROM {COPY_IMAGE_BASE}\n"
        f"COPY repository {MODELS_IMAGE_PATH}\n"
        "USER 1000\n"
    )


def tools_dockerfile(tag: str, extras: Sequence[str] = ("loadtest", "batch")) -> str:
    return (
        f"# The tools image: tritonforge {__version__} with the extras the locust pods and the batch Job\n"
        "# run. Build from the tritonforge source tree (the project root) and push:\n"
        f"#   docker build -f <this file> -t {tag} <tritonforge source> && docker push {tag}\n"
        f"FROM {TOOLS_IMAGE_BASE}\n"
        "COPY . /src\n"
        f'RUN python -m pip install --no-cache-dir "/src[{",".join(extras)}]" && rm -rf /src\n'
        "USER 1000\n"
        "WORKDIR /tmp\n"
    )
