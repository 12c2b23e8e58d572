"""CPU time and memory of a process tree, the machine's busy time, and what machine this is,
read from ``/proc`` (Linux), so the benchmark needs no psutil."""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
_PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
MB = 1024 * 1024


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    return text.rsplit(")", 1)[1].split()


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            kids.setdefault(int(fields[1]), []).append(int(entry.name))
    return kids


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (0 if it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * _TICK_S


def rss_bytes(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def _smaps_rollup_bytes(pid: int, field: str) -> int | None:
    """One field of ``/proc/<pid>/smaps_rollup`` in bytes (None where it cannot be read)."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def pss_bytes(pid: int) -> int:
    """Proportional set size: the RSS with each shared page split among the processes that
    map it. Sums over processes without counting a page twice, as RSS does for a forked
    child (Redis's AOF rewrite) that still shares its parent's pages. RSS where the kernel
    has no ``smaps_rollup``."""
    pss = _smaps_rollup_bytes(pid, "Pss")
    return rss_bytes(pid) if pss is None else pss


def _exe(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except OSError:
        return None


def resident_once_bytes(pid: int, parent: int | None) -> int:
    """RSS, less the written pages a forked child still shares with its parent (the same
    program, no exec: Redis's AOF rewrite). RSS counts those in both, so a rewrite caught by
    a sample added the whole dataset a second time; here they count once, in the parent. A
    process started by exec (every Python process here, Redis itself) shares no written
    pages with its parent and keeps its RSS."""
    rss = rss_bytes(pid)
    exe = _exe(pid)
    if parent is None or exe is None or exe != _exe(parent):
        return rss
    return max(0, rss - (_smaps_rollup_bytes(pid, "Shared_Dirty") or 0))


def hwm_bytes(pid: int) -> int:
    """The kernel's own peak RSS of one process (VmHWM)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def machine_busy_s() -> tuple[float, float]:
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) * _TICK_S, steal * _TICK_S


class ProcessTree:
    """A root process and its descendants, each named by ``component`` (the root's direct
    child it descends from, named by a classifier of its command line)."""

    def __init__(
        self,
        root_pid: int,
        classify: Callable[[str], str] | None = None,
        root_name: str = "supervisor",
        extra_roots: dict[int, str] | None = None,
    ):
        self.root_pid = root_pid
        self.root_name = root_name
        self.classify = classify or (lambda cmd: cmd.split(" ", 1)[0].rsplit("/", 1)[-1])
        self.extra_roots = dict(extra_roots or {})
        """Processes outside the root's tree that belong to the system (a Redis Cluster
        started beside ``rdv serve``): pid -> component, descendants included."""
        self.parent_of: dict[int, int] = {}
        """Member pid -> its parent, when that is a member too (as of the last ``members``)."""

    def members(self) -> dict[int, str]:
        """pid -> component, for the root and every live descendant, and the extra roots
        and theirs."""
        kids = _children_map()
        out = {self.root_pid: self.root_name}
        starts = [(child, self.classify(cmdline(child))) for child in kids.get(self.root_pid, [])]
        starts += [(pid, name) for pid, name in self.extra_roots.items() if _stat_fields(pid)]
        parent_of = {child: self.root_pid for child in kids.get(self.root_pid, [])}
        for start, name in starts:
            stack = [start]
            while stack:
                pid = stack.pop()
                out[pid] = name
                for kid in kids.get(pid, []):
                    parent_of[kid] = pid
                    stack.append(kid)
        self.parent_of = parent_of
        return out


@dataclass
class TreeSample:
    cpu_by_pid: dict[int, float]
    component: dict[int, str]
    machine_busy_s: float
    machine_steal_s: float
    t: float

    @classmethod
    def take(cls, tree: ProcessTree) -> TreeSample:
        members = tree.members()
        busy, steal = machine_busy_s()
        return cls({p: cpu_s(p) for p in members}, members, busy, steal, time.perf_counter())


def cpu_between(a: TreeSample, b: TreeSample) -> dict[str, float]:
    """CPU seconds per component between two samples (new processes count from zero)."""
    out: dict[str, float] = {}
    for pid, cpu in b.cpu_by_pid.items():
        name = b.component[pid]
        out[name] = out.get(name, 0.0) + cpu - a.cpu_by_pid.get(pid, 0.0)
    return {k: round(v, 3) for k, v in out.items()}


def busiest_share(a: TreeSample, b: TreeSample) -> dict[str, float]:
    """Per component of two or more processes, the busiest one's share of the component's CPU
    between the samples: 1/n when they shared the work evenly, 1.0 when one did it all.
    Processes that accept on one listening socket (uvicorn's workers, the gateways) can take
    a burst of new connections unevenly, and a closed loop of a few connections then keeps
    one of them busy and the others idle."""
    used: dict[str, list[float]] = {}
    for pid, cpu in b.cpu_by_pid.items():
        used.setdefault(b.component[pid], []).append(cpu - a.cpu_by_pid.get(pid, 0.0))
    return {name: round(max(v) / sum(v), 3) for name, v in used.items()
            if len(v) > 1 and sum(v) > 0}  # fmt: skip


@dataclass
class MemoryWatch:
    """Samples the tree's RSS in a thread; keeps the peak of the total and per component."""

    tree: ProcessTree
    interval_s: float = 0.25
    peak_total_bytes: int = 0
    peak_serving_bytes: int = 0
    """Peak of the total less a root named ``supervisor`` (``rdv serve``, which only starts
    and watches the others)."""
    peak_by_component: dict[str, int] = field(default_factory=dict)
    last_by_component: dict[str, int] = field(default_factory=dict)
    peak_serving_pss_bytes: int = 0
    """The same peak, of PSS: what the serving processes hold together, shared pages once."""
    peak_pss_by_component: dict[str, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def sample(self) -> None:
        by: dict[str, int] = {}
        pss: dict[str, int] = {}
        for pid, name in self.tree.members().items():
            by[name] = by.get(name, 0) + resident_once_bytes(pid, self.tree.parent_of.get(pid))
            pss[name] = pss.get(name, 0) + pss_bytes(pid)
        serving_pss = sum(v for k, v in pss.items() if k != "supervisor")
        self.peak_serving_pss_bytes = max(self.peak_serving_pss_bytes, serving_pss)
        for name, value in pss.items():
            self.peak_pss_by_component[name] = max(self.peak_pss_by_component.get(name, 0), value)
        self.last_by_component = by
        self.peak_total_bytes = max(self.peak_total_bytes, sum(by.values()))
        serving = sum(v for k, v in by.items() if k != "supervisor")
        self.peak_serving_bytes = max(self.peak_serving_bytes, serving)
        for name, value in by.items():
            self.peak_by_component[name] = max(self.peak_by_component.get(name, 0), value)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def __enter__(self) -> MemoryWatch:
        self.sample()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sample()


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total_mb = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_total_mb = int(line.split()[1]) // 1024
    except OSError:
        pass
    return {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpus": os.cpu_count(),
        "mem_total_mb": mem_total_mb,
        "python": platform.python_version(),
        "loadavg_at_start": list(os.getloadavg()),
    }
