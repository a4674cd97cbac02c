"""``vtune search --workers N`` / ``--devices``: the workers of one study on one node, planned.

Planning is pure (:func:`plan_fleet`): the node's devices are cut into one group per worker. On
GPUs a group holds as many GPUs as the space's largest ``tensor_parallel_size`` (times a fixed
``pipeline_parallel_size``) and becomes the worker's vLLM ``CUDA_VISIBLE_DEVICES``; on ``--gpu
cpu`` the CPUs this process may run on (``os.sched_getaffinity``) are split into disjoint,
nearly equal sets: the worker runs on its set (:func:`pin`) and gives it to vLLM as
``VLLM_CPU_OMP_THREADS_BIND``. Each worker also gets its own range of ports for its vLLM
servers (``VTUNE_PORT_RANGE``, read by :func:`tuner.engine.http.find_free_port`:
``PORT_BASE + i * PORT_STRIDE`` on, the base from ``VTUNE_PORT_BASE``), and a label (``w0``...).
More workers than devices (or GPU groups) is one line and exit 2. ``--workers`` alone defaults
the devices to every CPU / GPU this process may use (``CUDA_VISIBLE_DEVICES`` when set);
``--devices`` alone runs as many workers as it holds groups.

Running them, the parent and its children: :mod:`tuner.search.fleet_run`.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, replace

from tuner.errors import ParameterError, VtuneError
from tuner.search.prepare import Prepared

PORT_BASE = 28000  # below Linux's ephemeral ports (32768-60999): the OS never hands them out
PORT_STRIDE = 100
PORT_BASE_ENV = "VTUNE_PORT_BASE"
PORT_RANGE_ENV = "VTUNE_PORT_RANGE"  # read by tuner.engine.http.find_free_port


class WorkerFailed(VtuneError):
    """A worker of the fleet failed (its own one line), or every worker died."""


@dataclass(frozen=True)
class Slot:
    """One worker: its index, its device group (GPU ids or CPU numbers, as strings), whether
    they are CPUs, and its ports (first, last)."""

    index: int
    devices: tuple[str, ...]
    cpu: bool
    ports: tuple[int, int]

    @property
    def label(self) -> str:
        return f"w{self.index}"

    def where(self) -> str:
        return f"CPUs {cpu_list(self.devices)}" if self.cpu else f"GPUs {','.join(self.devices)}"

    def describe(self) -> str:
        return f"{self.label}: {self.where()}, ports {self.ports[0]}-{self.ports[1]}"


@dataclass(frozen=True)
class FleetPlan:
    """The workers (one slot each), the devices left over, and the GPUs per worker."""

    slots: tuple[Slot, ...]
    unused: tuple[str, ...] = ()
    group: int = 1

    @property
    def size(self) -> int:
        return len(self.slots)


def plan_fleet(
    workers: int | None,
    devices: Sequence[str] | None,
    available: Sequence[str],
    *,
    cpu: bool,
    group: int = 1,
    port_base: int = PORT_BASE,
    port_stride: int = PORT_STRIDE,
) -> FleetPlan:
    """Cut ``devices`` (default: ``available``) into ``workers`` groups (default: as many as
    they hold). GPUs: ``group`` each, in order, each GPU once; the rest is ``unused``. CPUs:
    disjoint contiguous sets, sizes differing by one at most (a CPU listed twice in
    ``devices`` is shared: the user's choice). ParameterError (one line) when the devices do
    not hold the workers, a device is not ``available``, or a GPU is listed twice."""
    pool = [str(d).strip() for d in (devices if devices is not None else available)]
    what = "CPU" if cpu else "GPU"
    if devices is not None:
        unknown = [d for d in pool if available and d not in available]
        if unknown or not all(pool):
            raise ParameterError(
                f"--devices {','.join(pool)}: no {what} {','.join(unknown) or '(empty)'} here; "
                f"this process may use {_shown(available, cpu) or 'none'}"
            )
        if not cpu and len(set(pool)) < len(pool):
            raise ParameterError(f"--devices {','.join(pool)}: a GPU is listed twice")
    if not pool:
        raise ParameterError(f"no {what} found for the workers: give --devices (e.g. 0,1)")
    group = 1 if cpu else max(1, group)
    count = workers if workers is not None else len(pool) // group
    if count < 1 or count * group > len(pool):
        raise ParameterError(_too_few(count, group, pool, cpu, workers is not None))
    last = port_base + count * port_stride - 1
    if port_base < 1024 or last > 65535:
        raise ParameterError(f"{PORT_BASE_ENV}={port_base}: the ports must lie in 1024-65535")
    if cpu:
        size, extra = divmod(len(pool), count)
        bounds = [i * size + min(i, extra) for i in range(count + 1)]
        groups = [pool[bounds[i] : bounds[i + 1]] for i in range(count)]
        unused: list[str] = []
    else:
        groups = [pool[i * group : (i + 1) * group] for i in range(count)]
        unused = pool[count * group :]
    slots = tuple(
        Slot(
            i,
            tuple(dict.fromkeys(g)),
            cpu,
            (port_base + i * port_stride, port_base + (i + 1) * port_stride - 1),
        )
        for i, g in enumerate(groups)
    )
    return FleetPlan(slots, tuple(unused), group)


def _too_few(count: int, group: int, pool: list[str], cpu: bool, asked: bool) -> str:
    have = f"{len(pool)} here ({_shown(pool, cpu)})"
    if cpu:
        return (
            f"--workers {count} needs {count} CPUs, one each at least; this process may use "
            f"{have}: give fewer workers, or --devices (a CPU listed twice is shared)"
        )
    per = f" with tensor_parallel_size {group}" if group > 1 else ""
    if not asked:
        return f"one worker{per} needs {group} GPUs; --devices gives {have}"
    return f"--workers {count}{per} needs {count * group} GPUs; {have}"


def _shown(devices: Sequence[str], cpu: bool) -> str:
    return cpu_list(devices) if cpu else ",".join(devices)


def cpu_list(cpus: Sequence[str | int]) -> str:
    """CPU numbers as ranges, the form of ``VLLM_CPU_OMP_THREADS_BIND`` and taskset:
    ``0-3,8``."""
    nums = sorted({int(c) for c in cpus})
    parts: list[str] = []
    start = prev = None
    for n in [*nums, None]:
        if n is not None and prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    return ",".join(parts)


def parse_devices(text: str | None, cpu: bool) -> list[str] | None:
    """``--devices 0,1,2,3`` -> ``["0", "1", "2", "3"]`` (CPU ranges ``0-3`` allowed);
    None when not given; ParameterError on a malformed list."""
    if text is None:
        return None
    out: list[str] = []
    for part in (p.strip() for p in text.split(",")):
        lo, dash, hi = part.partition("-")
        if cpu and dash and lo.isdigit() and hi.isdigit() and int(lo) <= int(hi):
            out += [str(n) for n in range(int(lo), int(hi) + 1)]
        elif part and (not cpu or part.isdigit()):
            out.append(part)
        else:
            raise ParameterError(f"--devices {text!r}: expected ids such as 0,1,2,3")
    return out


def available_devices(cpu: bool) -> list[str]:
    """CPUs this process may run on; or the GPUs: ``CUDA_VISIBLE_DEVICES`` when set, else every
    GPU found (NVML / nvidia-smi)."""
    if cpu:
        return [str(c) for c in sorted(os.sched_getaffinity(0))]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    from tuner.specs.detect import detect_gpus

    return [str(g.index) for g in detect_gpus()]


def group_size(prep: Prepared) -> int:
    """GPUs one trial takes at most: the space's largest tensor_parallel_size (or the fixed
    one), times a fixed pipeline_parallel_size."""
    fixed = {str(k).replace("-", "_"): v for k, v in prep.config.engine_args}
    tps = [v for v in prep.space.values.get("tensor_parallel_size", ()) if v]
    tp = max([int(v) for v in tps] or [int(fixed.get("tensor_parallel_size") or 1)])
    return tp * int(fixed.get("pipeline_parallel_size") or 1)


def plan_for(prep: Prepared, workers: int | None, devices: str | None) -> FleetPlan | None:
    """The fleet ``--workers`` / ``--devices`` ask for; None for one unpinned worker (neither
    given, or ``--workers 1`` alone): the search as it always ran."""
    if (workers or 1) == 1 and devices is None:
        return None
    cpu = prep.gpu.is_cpu
    base = os.environ.get(PORT_BASE_ENV) or str(PORT_BASE)
    if not base.isdigit():
        raise ParameterError(f"{PORT_BASE_ENV}={base!r}: expected a port number, e.g. 28000")
    given = parse_devices(devices, cpu)
    plan = plan_fleet(
        workers, given, available_devices(cpu), cpu=cpu, group=group_size(prep), port_base=int(base)
    )
    cfg = prep.config
    if plan.size > 1 and (cfg.build_variants or cfg.max_quality_loss is not None):
        raise ParameterError(
            "--workers with --build-variants or --max-quality-loss: build and check the variants "
            "first (vtune quantize, or a one-worker search), then give them as --variant NAME=PATH"
        )
    return plan


def describe(prep: Prepared, plan: FleetPlan) -> list[str]:
    """Lines for the plan screen: the workers, and what is left idle."""
    if plan.size == 1:
        return [f"one worker, on {plan.slots[0].where()}"]
    lines = [f"{plan.size} workers on one study, each on its own devices and ports:"]
    lines += [f"  {slot.describe()}" for slot in plan.slots]
    if plan.unused:
        lines.append(f"  GPUs {','.join(plan.unused)} stay idle (groups of {plan.group})")
    return [*lines, storage_line(prep, plan.size)[1]]


def pin(prep: Prepared, slot: Slot) -> None:
    """Pin this process's search to ``slot``: vLLM's CUDA_VISIBLE_DEVICES, or (CPUs) this
    process and its children on those CPUs and vLLM's OpenMP threads bound to them."""
    launch = prep.config.launch
    if slot.cpu:
        os.sched_setaffinity(0, {int(c) for c in slot.devices})
        env = {**launch.env, "VLLM_CPU_OMP_THREADS_BIND": cpu_list(slot.devices)}
        launch = replace(launch, env=env)
    else:
        launch = replace(launch, cuda_visible_devices=",".join(slot.devices))
    prep.config = replace(prep.config, launch=launch)


def storage_line(prep: Prepared, workers: int) -> tuple[str, str]:
    """The study's storage for ``workers`` processes of one node, and the line that says so:
    ``--storage`` when given, else Optuna's journal file beside the profile (not SQLite: a
    journal appends under a file lock and takes many writers well)."""
    from tuner.search.storage import journal_url, redact

    if prep.config.storage is not None:
        from tuner.search.prepare import storage_for

        url = storage_for(prep)
        return url, f"study storage: {redact(url)} ({workers} workers on one node)"
    path = prep.yaml_path.parent / f"{prep.gpu.name}.study.journal"
    return journal_url(path), f"study storage: journal file {path} ({workers} workers on one node)"


def drop_options(
    args: Sequence[str], valued: Collection[str], flags: Collection[str] = ()
) -> list[str]:
    """``args`` less each option of ``valued`` with its value (``--opt V`` or ``--opt=V``)
    and each bare flag of ``flags``."""
    kept: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in valued:
            skip = True
        elif arg.split("=", 1)[0] not in {*valued, *flags}:
            kept.append(arg)
    return kept


def child_args(args: Sequence[str], slot: Slot, out: str, url: str) -> list[str]:
    """The worker's ``vtune search`` arguments: ``args`` (the command as given) without the
    options that are the parent's own (workers, devices, --out, storage, the metrics endpoint,
    dry-run views), then the worker's: ``--workers 1 --devices <group> --out --storage`` and
    its label. The metrics endpoint stays with the parent (its final phase serves it)."""
    valued = {"--workers", "--devices", "--out", "--storage", "--fleet-worker"}
    valued |= {"--metrics-port", "--metrics-host", "--pushgateway"}
    kept = drop_options(args, valued, flags={"--dry-run", "--json", "--all"})
    return [
        *kept,
        *("--workers", "1", "--devices", ",".join(slot.devices)),
        *("--out", out, "--storage", url, "--fleet-worker", slot.label),
    ]


__all__ = [
    "PORT_BASE",
    "PORT_STRIDE",
    "FleetPlan",
    "Slot",
    "WorkerFailed",
    "available_devices",
    "child_args",
    "cpu_list",
    "describe",
    "group_size",
    "parse_devices",
    "pin",
    "plan_fleet",
    "plan_for",
    "storage_line",
]
