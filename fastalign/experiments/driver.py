"""What every experiment shares: the seeds loop, each seed's run folder and flows, mean ± sd, the report.

An experiment module defines ``CLAIM`` (the lecture's claim it measures, one sentence), ``run_seed(run) ->
{metric: float}`` (one seed's measurements; a metric measured along an axis is named ``"<metric>/<axis>=<x>"``,
e.g. ``"heldout_exact_match/N=16"``), ``plot(results, root) -> [png paths]`` and ``findings(results) -> [lines]``
(what the numbers say, computed from them). :func:`run_experiment` writes ``<output_dir>/<name>/``:
``results.json`` (``{"seeds": {"seed0": {...}, ...}, "mean": {...}, "sd": {...}, ...}``), ``report.md`` and the
plots; each seed's flow runs live in ``seed<k>/<stage>/`` (config, metrics, curves, model), written by the flows'
own run-folder machinery (:mod:`fastalign.engine.runs`).

Seeds 0, 1, … set each flow's ``seed`` (its data draw, batch order and sampling) and the experiment's own draws;
the tiny model's initial weights are the same for every seed (it is built once from a fixed seed).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from fastalign.engine.runs import holds_run, write_json

PLOTS_EXTRA = "experiments"  # the pip extra that brings matplotlib (pyproject.toml)


@dataclass
class SeedRun:
    """One seed of one experiment: where its flows write and how big it is."""

    seed: int
    quick: bool
    threads: int
    root: Path  # the experiment's folder
    overwrite: bool = False

    @property
    def dir(self) -> Path:
        return self.root / f"seed{self.seed}"

    def flow(self, flow: str, stage: str, values: dict) -> tuple[dict, str]:
        """Run the registered flow ``flow`` as ``seed<k>/<stage>`` with ``values`` over its defaults; returns its
        report and the folder of the model it saved."""
        from fastalign.engine.config import load_config
        from fastalign.flows import FLOWS

        values = dict(values, name=f"seed{self.seed}/{stage}", output_dir=str(self.root), seed=self.seed,
                      threads=self.threads, progress=False, overwrite=self.overwrite)
        cfg = load_config(FLOWS[flow].config_class(), overrides=values)
        report = FLOWS[flow].run(cfg)
        return report, str(self.dir / stage / "model")

    def pipeline_stage(self, stage: str, flow: str | None = None, **changes) -> tuple[dict, str]:
        """A stage of ``fastalign pipeline`` with the pipeline's config for it (its ``QUICK`` one with
        ``--quick``), ``changes`` on top. A finished run of the same config and seed in a sibling experiment's
        folder (the SFT model several experiments start from) is reused instead of trained again."""
        from fastalign import pipeline

        values = pipeline.stage_values(stage, self.quick, changes)
        flow = flow or pipeline.STAGE_FLOW.get(stage, stage)
        done = self.finished_run(flow, stage, values)
        if done is not None:
            print(f"{stage}: reusing the finished run {done} (same config and seed)")
            return json.loads((done / "eval.json").read_text()), str(done / "model")
        return self.flow(flow, stage, values)

    def finished_run(self, flow: str, stage: str, values: dict) -> Path | None:
        """``<output_dir>/<other experiment>/seed<k>/<stage>`` when it finished (``eval.json`` is written last) with
        the config this stage would run (its folder, name and progress aside)."""
        import yaml

        from fastalign.engine.config import config_dict, load_config
        from fastalign.flows import FLOWS

        ignored = ("name", "output_dir", "overwrite", "progress")
        cfg = load_config(FLOWS[flow].config_class(), overrides=dict(values, seed=self.seed, threads=self.threads))
        wanted = {k: v for k, v in config_dict(cfg).items() if k not in ignored}
        for other in sorted(self.root.parent.glob(f"*/seed{self.seed}/{stage}")):
            if other.parent.parent == self.root or not (other / "eval.json").is_file():
                continue
            saved = yaml.safe_load((other / "config.yaml").read_text()) or {}
            if {k: v for k, v in saved.items() if k not in ignored} == wanted:
                return other
        return None


def aggregate(per_seed: dict) -> tuple[dict, dict]:
    """Mean and sample standard deviation (0 for one seed) of every metric every seed measured."""
    seeds = list(per_seed.values())
    keys = [k for k in seeds[0] if all(isinstance(s.get(k), (int, float)) for s in seeds)]
    mean = {k: statistics.fmean(s[k] for s in seeds) for k in keys}
    sd = {k: statistics.stdev(s[k] for s in seeds) if len(seeds) > 1 else 0.0 for k in keys}
    return mean, sd


def series(results: dict, metric: str) -> list[tuple[float, float, float, list[float]]]:
    """``[(x, mean, sd, [each seed's value]), ...]`` of the metrics named ``"<metric>/<axis>=<x>"``, by x."""
    points = []
    for key in results["mean"]:
        head, _, tail = key.rpartition("/")
        if head == metric and "=" in tail:
            x = float(tail.split("=", 1)[1])
            points.append((x, results["mean"][key], results["sd"][key], [s[key] for s in results["seeds"].values()]))
    return sorted(points)


def pyplot():
    """matplotlib's pyplot on the Agg backend; an ImportError naming the extra without it."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the experiment plots need matplotlib: pip install 'fastalign[experiments]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path, title: str) -> Path:
    """Title, lay out, write (PNG, 90 dpi) and close a figure; returns its path."""
    plt = pyplot()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)


def line_plot(path: Path, panels: dict, results: dict, *, xlabel: str, title: str, logx: bool = False) -> Path:
    """``panels``: ``{panel title: {line label: metric}}``; each line is the metric's mean ± sd against its axis
    value, with each seed's value as a dot."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.8 * len(panels), 3.6), squeeze=False)
    for ax, (name, lines) in zip(axes[0], panels.items()):
        for label, metric in lines.items():
            pts = series(results, metric)
            xs = [p[0] for p in pts]
            line = ax.errorbar(xs, [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=label)
            for x, *_, values in pts:
                ax.scatter([x] * len(values), values, s=8, alpha=0.4, color=line[0].get_color())
        if logx:
            ax.set_xscale("log", base=2)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, path, title)


def bar_plot(path: Path, panels: dict, results: dict, *, title: str) -> Path:
    """``panels``: ``{panel title: {bar label: metric}}``; each bar is the metric's mean ± sd, each seed a dot."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (name, bars) in zip(axes[0], panels.items()):
        for i, metric in enumerate(bars.values()):
            ax.bar(i, results["mean"][metric], yerr=results["sd"][metric], capsize=4, color="tab:blue", alpha=0.7)
            values = [s[metric] for s in results["seeds"].values()]
            ax.scatter([i] * len(values), values, s=10, color="black", zorder=3)
        ax.set_xticks(range(len(bars)), list(bars), rotation=15, ha="right", fontsize=8)
        ax.set_ylim(bottom=min(0.0, *(min(s[m] for s in results["seeds"].values()) for m in bars.values())))
        ax.set_title(name, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path, title)


def fmt(mean: float, sd: float) -> str:
    return f"{mean:.3f} ± {sd:.3f}"


def run_experiment(name: str, *, quick: bool = False, seeds: int = 3, threads: int = 0, jobs: int = 0,
                   output_dir: str = "runs/experiments", overwrite: bool = False, report_only: bool = False) -> dict:
    """Run experiment ``name`` for seeds 0..seeds-1; returns what ``results.json`` holds plus ``"report"``.

    ``jobs`` seeds run at once, each in its own process with ``threads`` torch threads (0 = :func:`parallel_jobs`:
    with ``threads=1`` on 2 cores, three seeds at once, sharing the cores).
    ``report_only``: run nothing; write ``report.md`` and the plots from the seeds an existing ``results.json``
    holds (it is rewritten after every seed, so a stopped run keeps what it measured)."""
    import torch

    module = _experiment_module(name)
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if threads < 0:
        raise ValueError(f"--threads must be >= 0, got {threads}")
    if jobs < 0:
        raise ValueError(f"--jobs must be >= 0 (0 = fit the cores), got {jobs}")
    pyplot()  # no plotting library: say so before minutes of training, not after
    root = Path(output_dir) / name
    if report_only:
        return _report_from_saved(root, name, module)
    if holds_run(root) and not overwrite:
        raise ValueError(f"experiment folder {root} already holds a run; pass --overwrite to replace it, or choose "
                         "another --output_dir")
    if holds_run(root):  # renamed aside first, so the name never points at a half-removed folder
        aside = root.parent / f".{root.name}.replaced-{os.getpid()}"
        os.rename(root, aside)
        shutil.rmtree(aside, ignore_errors=True)
    root.mkdir(parents=True, exist_ok=True)
    if threads:
        torch.set_num_threads(threads)

    jobs = min(jobs or parallel_jobs(threads, seeds), seeds)
    saved = {"experiment": name, "quick": quick, "threads": threads, "jobs": jobs, "machine": machine(), "seeds": {},
             "timings_s": {}}

    def record(seed, measured, seconds):
        saved["seeds"][f"seed{seed}"], saved["timings_s"][f"seed{seed}"] = measured, round(seconds, 1)
        for key in ("seeds", "timings_s"):  # seed order, whichever finished first
            saved[key] = dict(sorted(saved[key].items()))
        write_json(root / "results.json", saved)  # after every seed: a stopped run keeps what it measured

    calls = {seed: dict(name=name, seed=seed, quick=quick, threads=threads, root=root) for seed in range(seeds)}
    for seed, (measured, seconds) in run_seeds(_run_seed, calls, jobs):
        record(seed, measured, seconds)
    return finish(root, name, module, saved)


OVERSUBSCRIPTION = 2  # at most twice the seeds that fit the cores run at once (each holds its models in memory)


def parallel_jobs(threads: int, seeds: int) -> int:
    """Seeds to run at once: all of them, up to ``OVERSUBSCRIPTION`` × cores / threads (1 when torch picks the
    threads). Seeds beyond the cores time-share them: 3 one-thread seeds on 2 cores finish in 1.5 seed-times, where
    waves of 2 take 2 (the third alone on one core, the other idle). A seed's numbers do not depend on it."""
    if not threads:
        return 1
    return max(1, min(seeds, OVERSUBSCRIPTION * ((os.cpu_count() or 1) // threads)))


def run_seeds(fn, calls: dict, jobs: int):
    """Yield ``(seed, fn(**calls[seed]))`` for every seed, each as it finishes: one after another in this process
    when ``jobs`` is 1, else in ``jobs`` worker processes, each with the torch threads of its call's ``threads``."""
    if jobs == 1:
        for seed, kwargs in calls.items():
            yield seed, fn(**kwargs)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    # Spawned (not forked) workers: a fork of a process whose torch thread pool already ran can deadlock.
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {pool.submit(_with_threads, fn, kwargs): seed for seed, kwargs in calls.items()}
        for future in as_completed(futures):
            yield futures[future], future.result()


def _with_threads(fn, kwargs: dict):
    import torch

    if kwargs.get("threads"):
        torch.set_num_threads(kwargs["threads"])
    return fn(**kwargs)


def _run_seed(*, name: str, seed: int, quick: bool, threads: int, root: Path) -> tuple[dict, float]:
    """One seed of experiment ``name``: ``(its measurements, seconds)``."""
    t = time.time()
    measured = _experiment_module(name).run_seed(SeedRun(seed=seed, quick=quick, threads=threads, root=root))
    return measured, time.time() - t


def _experiment_module(name: str):
    from fastalign.experiments import EXPERIMENTS

    if name not in EXPERIMENTS:
        raise ValueError(f"experiment must be one of {', '.join(EXPERIMENTS)}, got {name!r}")
    return EXPERIMENTS[name].load()


def _report_from_saved(root: Path, name: str, module) -> dict:
    path = root / "results.json"
    if not path.is_file():
        raise ValueError(f"--report_only: {path} does not exist (run the experiment first)")
    saved = json.loads(path.read_text())
    if saved.get("experiment") != name or not saved.get("seeds"):
        raise ValueError(f"--report_only: {path} holds no measured seed of experiment {name!r}")
    return finish(root, name, module, saved)


def finish(root: Path, name: str, module, saved: dict) -> dict:
    """Aggregate the seeds in ``saved``, rewrite ``results.json`` with mean and sd, plot, write ``report.md``."""
    mean, sd = aggregate(saved["seeds"])
    results = dict(saved, claim=module.CLAIM, mean=mean, sd=sd)
    write_json(root / "results.json", results)
    plots = module.plot(results, root)
    report = write_report(root, name, module, results, plots)
    for line in module.findings(results):
        print(line)
    print(f"report: {report}")
    return dict(results, report=str(report))


def machine() -> str:
    """The CPU model, core count and torch version: the README says which machine produced its numbers."""
    import platform

    import torch

    model = platform.processor() or platform.machine()
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, torch {torch.__version__}"


def write_report(root: Path, name: str, module, results: dict, plots: list) -> Path:
    seeds = list(results["seeds"])
    threads = results.get("threads")
    command = f"fastalign experiment {name}" + (" --quick" if results.get("quick") else "") + (
        f" --seeds {len(seeds)}") + (f" --threads {threads}" if threads else "")
    lines = [f"# Experiment: {name}", "", f"**Claim** (lecture): {module.CLAIM}", "", f"Command: `{command}`", "",
             "## Findings", ""] + [f"- {line}" for line in module.findings(results)]
    lines += ["", "## Measurements (mean ± sd over seeds, then each seed)", "",
              "| metric | mean ± sd | " + " | ".join(seeds) + " |", "|---|---|" + "---|" * len(seeds)]
    for key in results["mean"]:
        cells = [f"{results['seeds'][s][key]:.3f}" for s in seeds]
        lines.append(f"| {key} | {fmt(results['mean'][key], results['sd'][key])} | " + " | ".join(cells) + " |")
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in plots]
    lines += ["", "## Runs", "", "Each seed's flow runs (config, metrics, curves, model) are in `seed<k>/<stage>/`. "
              "Seeds set the data draw, batch order and sampling; the tiny model's initial weights are the same for "
              "every seed.", "", f"Machine: {results.get('machine', 'not recorded')}.", "",
              "Time per seed (s): " + ", ".join(f"{k} {v}" for k, v in results.get("timings_s", {}).items())]
    path = root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimate from ``n`` samples of which ``c`` are correct (Chen et al., 2021)."""
    if k > n:
        raise ValueError(f"k must be <= n (the samples drawn), got k={k}, n={n}")
    if n - c < k:
        return 1.0
    return 1.0 - math.exp(sum(math.log(n - c - i) - math.log(n - i) for i in range(k)))
