"""What the allocated GPUs do during a run: utilisation, memory, power, and energy.

Whole-GPU allocation makes device-level readings the job's own. A sampler
thread reads NVML once per interval; energy is the difference of the device's
total energy counter (mJ) between the start and the end of the run, exact
rather than integrated from samples. Each sample also goes to `on_sample` when given
(engine.gpu_metrics.gpu_sample_recorder: the DCGM-named gauges /metrics serves).
Without GPUs (or NVML) the summary is empty.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPUReading:
    """One sample of one GPU, as NVML gave it."""

    uuid: str
    index: int
    utilisation_percent: float
    memory_used_bytes: int
    power_watts: float
    energy_millijoules: int | None  # since the driver loaded; None before Volta


@dataclass
class GPUUsage:
    uuid: str
    peak_memory_bytes: int = 0
    mean_utilisation_percent: float = 0.0
    peak_power_watts: float = 0.0
    energy_joules: float | None = None
    samples: int = 0


@dataclass
class TelemetrySampler:
    uuids: tuple[str, ...]
    interval_seconds: float = 1.0
    usage: dict[str, GPUUsage] = field(default_factory=dict)
    on_sample: Callable[[GPUReading], None] | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = None
        self._handles: dict[str, object] = {}
        self._energy_start: dict[str, int] = {}
        self._indices: dict[str, int] = {}

    def start(self) -> TelemetrySampler:
        if not self.uuids:
            return self
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:
            return self  # no NVML: nothing to sample
        self._nvml = pynvml
        for uuid in self.uuids:
            handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
            self._handles[uuid] = handle
            self.usage[uuid] = GPUUsage(uuid)
            with contextlib.suppress(pynvml.NVMLError):
                self._indices[uuid] = int(pynvml.nvmlDeviceGetIndex(handle))
            with contextlib.suppress(pynvml.NVMLError):
                self._energy_start[uuid] = pynvml.nvmlDeviceGetTotalEnergyConsumption(handle)
        self._thread = threading.Thread(target=self._loop, daemon=True, name="epreuve-gpu")
        self._thread.start()
        return self

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_seconds):
            self.sample()

    def sample(self) -> None:
        nvml = self._nvml
        for uuid, handle in self._handles.items():
            usage = self.usage[uuid]
            with contextlib.suppress(nvml.NVMLError):
                utilisation = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
                memory = nvml.nvmlDeviceGetMemoryInfo(handle).used
                power = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
                usage.mean_utilisation_percent = (usage.mean_utilisation_percent * usage.samples
                                                  + utilisation) / (usage.samples + 1)
                usage.samples += 1
                usage.peak_memory_bytes = max(usage.peak_memory_bytes, int(memory))
                usage.peak_power_watts = max(usage.peak_power_watts, power)
                self._report(uuid, handle, utilisation, memory, power)

    def _report(self, uuid: str, handle, utilisation, memory, power) -> None:
        if self.on_sample is None or uuid not in self._indices:
            return
        energy = None
        with contextlib.suppress(self._nvml.NVMLError):
            energy = int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))
        try:
            self.on_sample(GPUReading(uuid, self._indices[uuid], float(utilisation),
                                      int(memory), float(power), energy))
        except Exception:  # a consumer's fault never stops the sampling of a run
            log.exception("GPU sample consumer failed for %s", uuid)

    def stop(self) -> dict[str, GPUUsage]:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.sample()
            for uuid, handle in self._handles.items():
                with contextlib.suppress(self._nvml.NVMLError):
                    end = self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
                    if uuid in self._energy_start:
                        self.usage[uuid].energy_joules = (end - self._energy_start[uuid]) / 1000
            with contextlib.suppress(Exception):
                self._nvml.nvmlShutdown()
        return self.usage
