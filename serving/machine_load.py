"""What else the machine was doing while we timed: the CPU time other processes took (and the hypervisor
stole), the load average, the cores this process may run on and the threads PyTorch runs.

A ``snapshot`` is taken before and after each timed row; ``load_between`` turns two into the row's load
record. The cores were *shared* when other processes kept busy more than the cores PyTorch leaves free
(``cores - threads``) by ``SHARED_MARGIN``: on 2 cores with PyTorch on both, a process spinning on one core is
sharing, a shell prompt is not. Linux only (``/proc``); elsewhere the record says it was not taken.

Other processes' time is the machine's busy time (``/proc/stat``, the cores this process may use) less this
process's own CPU time, so processes that start and end between two snapshots (a compiler's) are counted;
``/proc/<pid>/stat`` names the busiest that are still alive. ``/proc/stat`` counts in clock ticks (10 ms), so a
short window's figure is uncertain by about a tick per core: the verdict allows for it.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

SHARED_MARGIN = 0.25  # cores: other processes' use beyond the free cores that counts as sharing
TICK = 1 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
PROC = Path("/proc")


@dataclass(frozen=True)
class Snapshot:
    """The machine at one moment: ``busy``/``steal`` in seconds summed over this process's cores since boot,
    ``own`` this process's CPU seconds, ``processes`` ``{pid: (name, CPU seconds)}`` of every other process."""

    wall: float
    busy: float | None
    steal: float | None
    own: float
    processes: dict = field(default_factory=dict)
    load_average: tuple[float, float, float] | None = None


def _cores() -> list[int]:
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def _cpu_seconds(cores: list[int]) -> tuple[float, float] | None:
    """``(busy, steal)`` seconds of ``cores`` since boot: user, nice, system, irq and softirq (guest time is
    inside user), and what the hypervisor took."""
    try:
        lines = (PROC / "stat").read_text().splitlines()
    except OSError:
        return None
    wanted = {f"cpu{c}" for c in cores}
    busy = steal = 0
    for line in lines:
        fields = line.split()
        if fields and fields[0] in wanted:
            ticks = [int(v) for v in fields[1:9]]
            busy += ticks[0] + ticks[1] + ticks[2] + ticks[5] + ticks[6]
            steal += ticks[7]
    return busy * TICK, steal * TICK


def _processes() -> dict[int, tuple[str, float]]:
    """Every other process's name and CPU seconds (user + system, its threads included)."""
    me = os.getpid()
    found = {}
    for entry in PROC.glob("[0-9]*"):
        pid = int(entry.name)
        if pid == me:
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:  # it ended while we looked
            continue
        name = raw[raw.index("(") + 1 : raw.rindex(")")]
        rest = raw[raw.rindex(")") + 2 :].split()
        found[pid] = (name, (int(rest[11]) + int(rest[12])) * TICK)  # utime, stime: fields 14 and 15
    return found


def snapshot() -> Snapshot:
    seconds = _cpu_seconds(_cores())
    return Snapshot(
        wall=time.monotonic(),
        busy=seconds[0] if seconds else None,
        steal=seconds[1] if seconds else None,
        own=time.process_time(),
        processes=_processes() if seconds else {},
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
    )


def load_between(before: Snapshot, after: Snapshot, threads: int) -> dict:
    """The load record of the window between two snapshots, for a row timed with ``threads`` PyTorch threads:
    ``seconds``, ``other_cores`` (other processes' CPU seconds per second), ``steal_cores``, ``load_1m`` (the
    load average at the end), ``cores``, ``threads``, ``busiest`` (``[{"pid", "name", "cores"}]``, at most 3),
    ``shared`` (``judge``) and, where shared, ``why_shared``."""
    seconds = max(after.wall - before.wall, 1e-9)
    cores = len(_cores())
    if before.busy is None or after.busy is None:
        return {"seconds": seconds, "cores": cores, "threads": threads, "shared": None, "recorded": False}
    busiest = []
    for pid, (name, cpu) in after.processes.items():
        used = (cpu - before.processes[pid][1]) if pid in before.processes else cpu
        if used / seconds >= 0.05:
            busiest.append({"pid": pid, "name": name, "cores": round(used / seconds, 3)})
    busiest = sorted(busiest, key=lambda p: -p["cores"])[:3]
    record = {
        "seconds": seconds,
        "other_cores": max(0.0, (after.busy - before.busy) - (after.own - before.own)) / seconds,
        "steal_cores": (after.steal - before.steal) / seconds,
        "load_1m": after.load_average[0] if after.load_average else None,
        "cores": cores,
        "threads": threads,
        "busiest": busiest,
        "recorded": True,
    }
    return judge(record)


def judge(record: dict) -> dict:
    """``record`` with ``shared`` set (and ``why_shared``, one line, where true): other processes and the hypervisor
    took more than the cores PyTorch left free plus ``SHARED_MARGIN``, beyond the window's tick resolution."""
    if not record.get("recorded", True):
        return record | {"shared": None}
    taken = record["other_cores"] + record.get("steal_cores", 0.0)
    free = max(0, record["cores"] - record["threads"])
    resolution = (record["cores"] + 1) * TICK / record["seconds"]
    shared = taken > free + SHARED_MARGIN + resolution
    record = record | {"shared": shared}
    if shared:
        record["why_shared"] = (
            f"cores shared: other processes took {taken:.2f} of {record['cores']} cores while PyTorch ran "
            f"{record['threads']} threads"
        )
    return record


def probe(threads: int, seconds: float = 1.0) -> dict:
    """The load before timing: a record of the next ``seconds`` while this process sleeps."""
    before = snapshot()
    time.sleep(seconds)
    return load_between(before, snapshot(), threads)
