"""Peak resident memory of this process, from /proc (Linux): shared by the benchmarks that measure it."""
from __future__ import annotations


def vm_hwm_bytes() -> int:
    """VmHWM: the peak RSS of this process since its exec (or since /proc/self/clear_refs was sent "5").
    Unlike ``ru_maxrss``, a child started by ``subprocess`` does not inherit its parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    raise RuntimeError("VmHWM not in /proc/self/status")
