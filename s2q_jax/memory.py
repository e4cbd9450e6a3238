"""Peak memory of a stretch of work (one calibration block), on the host and on the devices.

The process's lifetime peak (`ru_maxrss`) can only grow, so it cannot tell a
block that needs more memory from one that runs after a block that did.
On Linux the kernel's high-water mark of the resident set can be reset
(`/proc/self/clear_refs`), which gives each block its own peak; elsewhere
the lifetime peak is the fallback.
"""
from __future__ import annotations

import contextlib
import resource
import sys

import jax

_GIB = 2**30


def reset_host_peak() -> bool:
  """Starts a new host peak measurement; False where the OS cannot (then peaks are lifetime)."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")  # 5: reset the peak resident set size (VmHWM)
    return True
  except OSError:
    return False


def host_peak_gib() -> float:
  """Peak resident memory since the last `reset_host_peak` (or the process's start)."""
  with contextlib.suppress(OSError), open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024 / _GIB
  # ru_maxrss is in KiB on Linux, in bytes on macOS.
  scale = 1 if sys.platform == "darwin" else 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / _GIB


def device_peak_gib() -> float | None:
  """Largest peak of bytes in use over this process's devices, None where unreported (CPU)."""
  peaks = []
  for device in jax.local_devices():
    try:
      stats = device.memory_stats()
    except Exception:  # pylint: disable=broad-except  (backends without the query raise)
      stats = None
    if stats and "peak_bytes_in_use" in stats:
      peaks.append(stats["peak_bytes_in_use"])
  return max(peaks) / _GIB if peaks else None
