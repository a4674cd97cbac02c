"""CPU telemetry for :class:`tuner.measure.telemetry.Sampler`: psutil over a process tree.

vLLM's CPU build runs as a tree (the API server, EngineCore, its workers) whose members start
after the server does; :class:`ProcessTreeSource` finds them again at every reading.
"""

from __future__ import annotations

import glob
import os
from typing import Any

from tuner.measure.telemetry import PART_SEP


class ProcessTreeSource:
    """CPU and memory of a process tree (vLLM's CPU build: the API server, EngineCore, workers).

    Each reading walks the tree from ``root_pid`` again, so processes started after sampling
    began are included from the reading after they are first seen (psutil's per-process CPU
    percent needs one earlier call as its baseline). Keys: ``cpu_percent_total`` (100 = one
    core busy), ``rss_bytes_total``, ``num_processes``, and per process
    ``"<name>[<pid>]/cpu_percent"`` and ``"<name>[<pid>]/rss_bytes"``. Processes that vanish
    between the walk and the reading are skipped quietly; a root that is gone is an error.
    ``proc_children`` chooses how the tree is found (None: Linux's children lists where the
    kernel has them, else psutil's scan of every process; see :meth:`_tree_pids`).
    """

    def __init__(
        self,
        root_pid: int,
        *,
        per_process: bool = True,
        proc_children: bool | None = None,
        psutil: Any = None,
    ) -> None:
        self.root_pid = root_pid
        self.per_process = per_process
        self.device = "cpu"
        self._psutil = psutil
        self._procs: dict[int, Any] = {}
        self._root: Any = None
        self._fast = False
        self._proc_children = proc_children

    def start(self) -> None:
        if self._psutil is None:
            import psutil  # the CPU path only; installed with vLLM's CPU build

            self._psutil = psutil
        self._root = self._psutil.Process(self.root_pid)
        self._fast = os.path.exists(f"/proc/{self.root_pid}/task/{self.root_pid}/children")
        if self._proc_children is not None:
            self._fast = self._proc_children
        self._walk()  # prime every process's CPU baseline

    def _tree_pids(self) -> list[int]:
        """The root and its descendants. Linux's ``/proc/<pid>/task/<tid>/children`` lists are
        read from the root down (about 0.1 ms for a small tree); where the kernel has none,
        psutil's ``children``, which reads every process on the host (3 ms for 100)."""
        if not self._fast:
            try:
                return [self.root_pid, *(p.pid for p in self._root.children(recursive=True))]
            except self._psutil.Error:
                return [self.root_pid]
        pids, queue = [self.root_pid], [self.root_pid]
        while queue:
            pid = queue.pop()
            for path in glob.glob(f"/proc/{pid}/task/*/children"):
                try:
                    with open(path, encoding="ascii") as fh:
                        kids = [int(x) for x in fh.read().split()]
                except (OSError, ValueError):  # the task or the process is gone
                    continue
                pids += kids
                queue += kids
        return pids

    def _walk(self) -> tuple[list[Any], list[Any]]:
        """The tree now: (processes with a CPU baseline, processes first seen in this walk).
        A pid is taken to be the same process for as long as it stays in the tree."""
        ps = self._psutil
        pids = self._tree_pids()
        known, new = [], []
        for pid in pids:
            cached = self._procs.get(pid)
            if cached is not None:
                known.append(cached)
                continue
            try:
                proc = ps.Process(pid)
                proc.cpu_percent(None)  # the baseline: this process counts from the next reading
            except ps.Error:
                continue
            self._procs[pid] = proc
            new.append(proc)
        live = set(pids)
        for pid in [pid for pid in self._procs if pid not in live]:
            del self._procs[pid]
        return known, new

    def read(self) -> dict[str, float]:
        ps = self._psutil
        if not self._root.is_running():
            raise ps.NoSuchProcess(self.root_pid)
        known, new = self._walk()
        cpu_total = rss_total = 0.0
        out: dict[str, float] = {}
        seen = 0
        for proc, has_baseline in [*((p, True) for p in known), *((p, False) for p in new)]:
            try:
                with proc.oneshot():
                    cpu = proc.cpu_percent(None) if has_baseline else None
                    rss = float(proc.memory_info().rss)
                    name = proc.name()
            except ps.Error:  # gone (NoSuchProcess, ZombieProcess) or not ours (AccessDenied)
                continue
            seen += 1
            rss_total += rss
            if cpu is not None:
                cpu_total += cpu
            if self.per_process:
                part = f"{name}[{proc.pid}]"
                if cpu is not None:
                    out[f"{part}{PART_SEP}cpu_percent"] = cpu
                out[f"{part}{PART_SEP}rss_bytes"] = rss
        out |= {
            "cpu_percent_total": cpu_total,
            "rss_bytes_total": rss_total,
            "num_processes": float(seen),
        }
        return out

    def errors(self) -> list[str]:
        return []

    def close(self) -> None:
        self._procs.clear()
