"""Reading a process's memory: RSS and peak RSS on the CPU; NVML per-process bytes and the CUDA
caching allocator's graph-pool segments on the GPU. Bytes throughout; None where not readable."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os

import torch

log = logging.getLogger("modelhive.memory")


def rss_bytes() -> int:
    """Resident set size of this process (bytes)."""
    return _proc_status("VmRSS")


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@functools.cache
def _libc_malloc_trim():
    """glibc's ``malloc_trim``, or None (another C library)."""
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def release_free_heap() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim(0)``; no-op elsewhere), so
    that a following RSS peak counts the pages a step touches, not the ones an earlier step freed
    into the heap and the next one reuses without growing the RSS."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)


_nvml_ready: bool | None = None


def _nvml():
    """The ``pynvml`` module, initialised once; None without nvidia-ml-py or a driver."""
    global _nvml_ready
    if _nvml_ready is False:
        return None
    try:
        import pynvml

        if not _nvml_ready:
            pynvml.nvmlInit()
            _nvml_ready = True
        return pynvml
    except Exception:  # ImportError, NVMLError (no driver)
        _nvml_ready = False
        return None


def _nvml_handle(pynvml, device: torch.device):
    """NVML handle of torch's ``device`` (matched by UUID, else PCI bus id, so that
    CUDA_VISIBLE_DEVICES renumbering does not matter)."""
    props = torch.cuda.get_device_properties(device)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        with contextlib.suppress(Exception):
            return pynvml.nvmlDeviceGetHandleByUUID(f"GPU-{uuid}")
    with contextlib.suppress(Exception):
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus.encode())
    return pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)


def nvml_process_bytes(device: torch.device) -> int | None:
    """Device memory NVML reports for this process on ``device``; None when unknown."""
    pynvml = _nvml()
    if pynvml is None:
        return None
    try:
        handle = _nvml_handle(pynvml, device)
        procs = pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
    except Exception:
        return None
    pid = os.getpid()
    for proc in procs:
        if proc.pid == pid and proc.usedGpuMemory is not None:
            return int(proc.usedGpuMemory)
    return None


def graph_pool_bytes(device: torch.device) -> int:
    """Bytes of caching-allocator segments on ``device`` that belong to CUDA graph pools."""
    total = 0
    for seg in torch.cuda.memory_snapshot():
        if seg.get("device") == device.index and tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0):
            total += seg["total_size"]
    return total


def _cuda_index(device: torch.device) -> torch.device:
    return torch.device("cuda", device.index if device.index is not None
                        else torch.cuda.current_device())
