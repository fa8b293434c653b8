"""What the benchmark suites share: timing, peak memory, one subprocess per measurement, reports.

Peak memory is measured in a fresh process per implementation, so one implementation's cached
allocations never hide another's: on CPU the growth of the resident set's high-water mark
(``/proc/self/clear_refs`` resets it; glibc is told to return every large block to the OS so a
warm-up cannot pre-fault the memory the measured call uses), on CUDA the peak of
``torch.cuda.max_memory_allocated`` above the allocated bytes before the call.
"""

from __future__ import annotations

import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

# Environment of the memory-measuring subprocesses (see the module docstring).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"{field}:\s+(\d+)", f.read()).group(1))


class PeakMemory:
    """``with PeakMemory(device) as m: ...`` then ``m.peak_mb``: peak growth over the block, MiB."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)
        self.peak_mb = float("nan")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
            self.base = _status_kb("VmRSS") * 1024
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
        else:
            peak = _status_kb("VmHWM") * 1024
        self.peak_mb = (peak - self.base) / 2**20


def time_calls(fn: Callable[[], None], iters: int, device: torch.device | str, warmup: int = 1) -> dict:
    """Wall and process-CPU seconds of ``fn`` (median over ``iters`` after ``warmup`` calls)."""
    device = torch.device(device)

    def call():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(warmup):
        call()
    wall, cpu = [], []
    for _ in range(iters):
        w0, c0 = time.perf_counter(), time.process_time()
        call()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    # CPU seconds per thread are what a shared, oversubscribed machine distorts least.
    return {"seconds": statistics.median(wall), "all_seconds": wall,
            "cpu_seconds": statistics.median(cpu), "threads": torch.get_num_threads()}


def run_worker(module: str, argv: list[str], *, memory: bool, timeout: float) -> dict:
    """Run ``python -m module *argv`` and return the JSON object on its last ``{``-line (or an error)."""
    env = dict(os.environ, **MEMORY_ENV) if memory else dict(os.environ)
    try:
        proc = subprocess.run([sys.executable, "-m", module, *argv], capture_output=True, text=True,
                              timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit code {proc.returncode}"}
    return json.loads(lines[-1])


def machine_info(device: torch.device | str) -> dict:
    device = torch.device(device)
    info = {"device": device.type, "torch": torch.__version__, "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        info["load_average_1m"] = os.getloadavg()[0]  # > cpus means the timings are noisy
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """``columns`` = (key, header, format spec); missing values print as ``-``."""
    cells = [[h for _, h, _ in columns]]
    for r in rows:
        cells.append([("-" if r.get(k) is None else format(r[k], f)) for k, _, f in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for i, line in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(line, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def bar_chart(path: str, title: str, names: list[str], panels: list[tuple[str, list[float | None]]]) -> str | None:
    """One horizontal bar panel per (label, values); returns the path, or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 0.5 * len(names) + 1.6), squeeze=False)
    for ax, (label, values) in zip(axes[0], panels):
        vals = [0.0 if v is None else v for v in values]
        bars = ax.barh(names, vals, color=["#4c72b0" if v is not None else "#dddddd" for v in values])
        ax.set_xlabel(label)
        ax.invert_yaxis()
        for bar, v in zip(bars, values):
            ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " n/a" if v is None else f" {v:.3g}",
                    va="center", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)  # the chart is written before the JSON
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_json(path: str, report: dict) -> str:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    return path
