"""Shared-memory regions for large tensors: system (POSIX, same host) and CUDA (a GPU and cuda-python).

The regions are ours to create and remove: POSIX regions are files under ``/dev/shm`` opened directly (no
``multiprocessing`` resource tracker, which would start a helper process and warn at exit). A pool hands a
free region of the right size to each request and takes it back after the answer; :meth:`close` removes
them all. Registering a region with a server is I/O and stays with the clients.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from tritonforge.errors import ClientError

__all__ = ["SHM_DIR", "CudaRegion", "ShmPool", "SystemRegion", "is_local", "system_shm_available"]

SHM_DIR = Path("/dev/shm")
_ALIGN = 64
_LOCAL_HOSTS = ("127.", "localhost", "[::1]", "::1", "unix:")


def system_shm_available() -> bool:
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def is_local(url: str) -> bool:
    """Whether an endpoint is on this host (so system shared memory can reach it)."""
    host = url.split("://", 1)[-1]
    return host.startswith(_LOCAL_HOSTS)


class SystemRegion:
    """One POSIX shared-memory region, mapped into this process."""

    kind = "system"

    def __init__(self, name: str, size: int) -> None:
        self.name = name  # Triton's name for it
        self.key = "/" + name  # the POSIX key (its file is SHM_DIR / name)
        self.size = size
        self.registered_on: set[str] = set()
        fd = os.open(SHM_DIR / name, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            self._map = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def write(self, offset: int, data: Any) -> None:
        view = memoryview(data).cast("B")
        self._map[offset : offset + len(view)] = view

    def destroy(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self._map.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(SHM_DIR / self.name)


class CudaRegion:
    """One CUDA shared-memory region on ``device`` (through tritonclient's cuda_shared_memory)."""

    kind = "cuda"

    def __init__(self, name: str, size: int, device: int) -> None:
        try:
            from tritonclient.utils import cuda_shared_memory as cudashm
        except ImportError as exc:  # pragma: no cover - depends on the machine
            raise ClientError("CUDA shared memory needs tritonclient[cuda] and cuda-python") from exc
        self._cudashm = cudashm
        self.name = name
        self.size = size
        self.device = device
        self.registered_on: set[str] = set()
        self._handle = cudashm.create_shared_memory_region(name, size, device)  # pragma: no cover

    def write(self, offset: int, data: Any) -> None:  # pragma: no cover - needs a GPU
        array = np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
        self._cudashm.set_shared_memory_region(self._handle, [array], offset=offset)

    def raw_handle(self) -> bytes:  # pragma: no cover - needs a GPU
        return bytes(self._cudashm.get_raw_handle(self._handle))

    def destroy(self) -> None:  # pragma: no cover - needs a GPU
        self._cudashm.destroy_shared_memory_region(self._handle)


def cuda_available() -> bool:
    """A GPU and the CUDA Python packages are present."""
    try:
        from tritonclient.utils import cuda_shared_memory  # noqa: F401
    except Exception:
        return False
    try:  # pragma: no cover - depends on the machine
        from cuda import cudart

        err, count = cudart.cudaGetDeviceCount()
        return int(err) == 0 and count > 0
    except Exception:
        return False


class ShmPool:
    """Free regions by size; a request takes one (or a new one) and gives it back when answered."""

    def __init__(self, kind: str = "system", device: int = 0) -> None:
        self.kind = kind
        self.device = device
        self.prefix = f"tfc_{os.getpid()}_{uuid.uuid4().hex[:8]}_"
        self._free: list[SystemRegion | CudaRegion] = []
        self._all: list[SystemRegion | CudaRegion] = []
        self._lock = threading.Lock()
        self._count = 0
        self.closed = False

    @staticmethod
    def layout(sizes: list[int]) -> tuple[list[int], int]:
        """Offsets (aligned) for tensors of ``sizes`` in one region, and the region's size."""
        offsets, end = [], 0
        for size in sizes:
            offsets.append(end)
            end += -(-max(size, 1) // _ALIGN) * _ALIGN
        return offsets, end

    def acquire(self, size: int) -> SystemRegion | CudaRegion:
        with self._lock:
            if self.closed:
                raise ClientError("the client is closed")
            fits = [r for r in self._free if r.size >= size]
            if fits:
                region = min(fits, key=lambda r: r.size)
                self._free.remove(region)
                return region
            self._count += 1
            name = f"{self.prefix}{self._count}"
            capacity = 1 << max(12, (size - 1).bit_length())  # powers of two, so regions get reused
            new: SystemRegion | CudaRegion = (
                CudaRegion(name, capacity, self.device)
                if self.kind == "cuda"
                else SystemRegion(name, capacity)
            )
            self._all.append(new)
            return new

    def release(self, region: SystemRegion | CudaRegion) -> None:
        with self._lock:
            if self.closed:
                return
            self._free.append(region)

    def discard(self, region: SystemRegion | CudaRegion) -> None:
        """Remove a region no server took (a failed registration); one a server holds goes back instead."""
        if region.registered_on:
            self.release(region)
            return
        with self._lock:
            if region in self._all:
                self._all.remove(region)
        region.destroy()

    def regions(self) -> list[SystemRegion | CudaRegion]:
        with self._lock:
            return list(self._all)

    def close(self) -> None:
        """Remove every region (callers unregister them from the servers first)."""
        with self._lock:
            self.closed = True
            regions, self._all, self._free = self._all, [], []
        for region in regions:
            region.destroy()
