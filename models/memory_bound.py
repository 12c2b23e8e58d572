"""A model process's memory, bounded: a model that asks for much more on some input fails that
run instead of taking the host's memory.

A 656-byte ONNX file can ask onnxruntime for gigabytes (``ConstantOfShape`` sized by a
feature) on an input the upload's dry run never tried. Unbounded, the allocation succeeds
while the host has memory, and the kernel's out-of-memory killer then picks a process, perhaps
Redis or the worker host that serves every other deployment. Bounded, onnxruntime's allocator
is refused and the run fails like any model failure: its requests get the model's error and
the fallbacks answer. The bound is ``RLIMIT_DATA`` (heap and private anonymous memory, what
onnxruntime's arena and numpy allocate), so reserved address space and mapped files are not
counted against it; it is what the process holds with its models loaded plus a headroom for
a run, set again after each load.
"""

from __future__ import annotations

import os
import resource
from pathlib import Path

MIN_MB = 256
"""Below this a worker cannot load onnxruntime and a model at all."""


CGROUP_LIMITS = (Path("/sys/fs/cgroup/memory.max"),
                 Path("/sys/fs/cgroup/memory/memory.limit_in_bytes"))  # fmt: skip
"""A container's memory limit: cgroup v2's, else v1's ("max" or a huge number: none)."""


def host_memory_mb(cgroup_limits: tuple[Path, ...] = CGROUP_LIMITS) -> int:
    """The machine's memory, or the container's limit where it is lower (in a container the
    machine's figure is the host's, and half of it may be more than the container has)."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in cgroup_limits:
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text.isdigit():
            total = min(total, int(text))
        break
    return total >> 20


def default_mb() -> int:
    """Half the host's (or container's) memory: no model process may take more, whatever its
    input."""
    return max(host_memory_mb() // 2, MIN_MB)


_headroom: int | None = None
"""Bytes a run may add to what the process holds with its models loaded (None: unbounded)."""


def held_bytes() -> int:
    """What ``RLIMIT_DATA`` is checked against: the process's private writable memory (its
    ``VmData``); 0 where the system does not say."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmData:"):
                return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


def bound_memory(headroom_mb: int | None) -> int | None:
    """Let this process's data memory grow at most ``headroom_mb`` past what it holds now (None:
    ``default_mb()``; 0: leave it unbounded), and past what it holds after each model load
    (``rebound``): a bound on what one run may take, not on the models a host serves (a worker
    host of many large models would otherwise fail to load them). Returns the bound in MB."""
    global _headroom
    wanted = default_mb() if headroom_mb is None else headroom_mb
    _headroom = wanted << 20 if wanted > 0 else None
    return rebound()


def rebound() -> int | None:
    """Set the bound from what the process holds now, after a model loaded (its weights are
    not a run's): the soft limit only, never above a hard one already set. The bound in MB, or
    None when unbounded."""
    if _headroom is None:
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = held_bytes() + _headroom
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit >> 20
