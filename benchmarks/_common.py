"""What the speed benchmarks share: the machine's description, timing, FLOP counting, the
matmul peak, peak-memory measurement and the one JSON line each benchmark ends with.

Timings on a shared machine are noisy, so every figure a target is judged on is a RATIO of two
things measured in the same process, interleaved where that matters (see ``interleaved``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def machine() -> str:
    """CPU model and core count (or the GPU's name)."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} CPUs"


def load_average() -> float | None:
    """The 1-minute load average: how contended the machine was (None where unknown)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def setup(threads: int, seed: int = 0) -> dict[str, Any]:
    """Fix the thread count and seed; return the facts every benchmark states."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    return {"machine": machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default)"), "load_avg_1m": load_average()}


def add_run_options(p: argparse.ArgumentParser, warmup: int) -> None:
    """The options every timing benchmark takes: threads, timed and warm-up iterations, the
    miniature run the tests use, and where to write the JSON line."""
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=warmup)
    p.add_argument("--smoke", action="store_true", help="miniature sizes and 1 iteration (for tests)")
    p.add_argument("--json-out", help="also write the JSON line to this file")


def say(*lines: str) -> None:
    """Human-readable lines before the JSON line (stdout, flushed so `make bench` shows progress)."""
    for line in lines:
        print(line, flush=True)


def emit(figures: dict[str, Any], path: str | None = None) -> None:
    """The benchmark's last line: one JSON object (also written to ``path`` when given), with the
    load average at the end of the run beside the one at its start."""
    line = json.dumps({**figures, "load_avg_1m_end": load_average()}, sort_keys=False)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(line + "\n")
    print(line, flush=True)


def clock(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], Any], iters: int, warmup: int) -> float:
    """Median seconds of ``iters`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    return statistics.median(clock(fn) for _ in range(max(1, iters)))


def interleaved(fns: dict[str, Callable[[], Any]], iters: int, warmup: int) -> dict[str, float]:
    """Median seconds of each function, timed in rounds (a, b, c, a, b, c, ...) so that a burst
    of load from other processes hits all of them alike and their ratios stay meaningful."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, iters)):
        for name, fn in fns.items():
            times[name].append(clock(fn))
    return {name: statistics.median(ts) for name, ts in times.items()}


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """(total FLOPs, FLOPs per aten op) of one call, as torch.utils.flop_counter counts them
    (matrix multiplies, convolutions and attention; elementwise work is not counted)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    per_op: dict[str, int] = {}
    for op, n in counter.get_flop_counts().get("Global", {}).items():
        per_op[str(op)] = per_op.get(str(op), 0) + int(n)
    return int(counter.get_total_flops()), per_op


def matmul_peak_fn(n: int = 4096) -> tuple[Callable[[], Any], int]:
    """A large fp32 matrix multiply and its FLOPs: what this machine's BLAS reaches at best."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    return (lambda: torch.mm(a, b, out=out)), 2 * n ** 3


def conv_peak_fn(channels: int = 256, size: int = 64, batch: int = 8) -> tuple[Callable[[], Any], int]:
    """A large 3x3 fp32 convolution (channels_last, through oneDNN) and its FLOPs. On some CPUs
    (AMD with MKL) oneDNN's convolutions run faster than MKL's matrix multiply, so the matmul
    alone would understate what the machine can do."""
    import torch.nn.functional as F

    x = torch.randn(batch, channels, size, size).contiguous(memory_format=torch.channels_last)
    w = torch.randn(channels, channels, 3, 3).contiguous(memory_format=torch.channels_last)
    return (lambda: F.conv2d(x, w, padding=1)), 2 * batch * channels * channels * 9 * size * size


def peak_cpu_memory(fn: Callable[[], Any]) -> int:
    """Peak bytes allocated on top of what was live when ``fn`` started (CPU tensors), from the
    profiler's allocation events replayed in order."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The allocation events ("[memory]", signed sizes) are in the raw results; recent versions of
    # the profiler leave them out of prof.events().
    raw = prof.profiler.kineto_results.events()
    allocations = sorted((e.start_ns(), e.nbytes()) for e in raw if e.name() == "[memory]" and e.device_type().name == "CPU")
    live = peak = 0
    for _, delta in allocations:
        live += delta
        peak = max(peak, live)
    return peak


def op_profile(fn: Callable[[], Any], top: int = 12) -> list[dict[str, Any]]:
    """The ops that take the most self CPU time in one call of ``fn``: name, ms, share."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    rows = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in rows) or 1
    rows.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "ms": round(e.self_cpu_time_total / 1e3, 1),
             "share": round(e.self_cpu_time_total / total, 3)} for e in rows[:top]]
