"""A model process's memory, bounded: a model that asks for more on some input fails that run
instead of taking the host's memory.

A 656-byte ONNX file can ask onnxruntime for gigabytes (``ConstantOfShape`` sized by a
feature) on an input the upload's dry run never tried. Unbounded, the allocation succeeds
while the host has memory, and the kernel's out-of-memory killer then picks a process, perhaps
Redis or the worker host that serves every other deployment. Bounded, onnxruntime's allocator
is refused and the run fails like any model failure: its requests get the model's error and
the fallbacks answer. The bound is ``RLIMIT_DATA`` (heap and private anonymous memory, what
onnxruntime's arena and numpy allocate), so reserved address space and mapped files are not
counted against it.
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


def bound_memory(limit_mb: int | None) -> int | None:
    """Bound this process's data memory to ``limit_mb`` (None: ``default_mb()``; 0: leave it
    unbounded). The soft limit only, never above a hard one already set; returns the bound in
    MB, or None when unbounded."""
    wanted = default_mb() if limit_mb is None else limit_mb
    if wanted <= 0:
        return None
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = wanted << 20
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    return limit >> 20
