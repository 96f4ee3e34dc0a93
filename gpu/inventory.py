"""Which GPUs this node has, through NVML (nvidia-ml-py).

On a node without NVIDIA GPUs, without the driver, or without the library, the
inventory is empty, never an error: the node then runs CPU jobs only.
GPUs are identified by UUID, never by index (indices change across reboots).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass


@dataclass(frozen=True)
class GPU:
    uuid: str
    index: int
    name: str
    memory_bytes: int
    driver_version: str


def _nvml():
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return None
    return pynvml


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def list_gpus() -> list[GPU]:
    nvml = _nvml()
    if nvml is None:
        return []
    try:
        driver = _text(nvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(GPU(uuid=_text(nvml.nvmlDeviceGetUUID(handle)), index=index,
                            name=_text(nvml.nvmlDeviceGetName(handle)),
                            memory_bytes=int(nvml.nvmlDeviceGetMemoryInfo(handle).total),
                            driver_version=driver))
        return gpus
    except nvml.NVMLError:
        return []
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def cuda_driver_version() -> str | None:
    """The CUDA version the driver supports ("12.4"), or None without NVML."""
    nvml = _nvml()
    if nvml is None:
        return None
    try:
        version = int(nvml.nvmlSystemGetCudaDriverVersion())  # 12040 for 12.4
        return f"{version // 1000}.{version % 1000 // 10}"
    except nvml.NVMLError:
        return None
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
