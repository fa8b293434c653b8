"""Run logging: tqdm progress, ``metrics.jsonl``, optional TensorBoard, and a PNG of the curves at the end."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .runs import commit_run


class RunLogger:
    """Logs on the main process only; every other process gets a logger that does nothing."""

    def __init__(self, run_dir, *, total_steps, start_step=0, enabled=True, progress=True, tensorboard=False,
                 desc="train"):
        self.run_dir = Path(run_dir)
        commit_run(self.run_dir)  # a loop that logs has finished its setup (a no-op once the folder is written)
        self.enabled = enabled
        self.path = self.run_dir / "metrics.jsonl"
        self.bar = None
        self.tb = None
        if not enabled:
            return
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=desc, dynamic_ncols=True, leave=False)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise ImportError("tensorboard=true needs the tensorboard package: pip install tensorboard") from e
            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))
        if start_step == 0 and self.path.exists():
            self.path.unlink()
        elif start_step > 0 and self.path.exists():
            # A resumed run drops lines logged after its checkpoint, so the curve has no duplicates.
            lines = [ln for ln in self.path.read_text().splitlines()
                     if ln and json.loads(ln).get("step", 0) <= start_step]
            self.path.write_text("".join(ln + "\n" for ln in lines))
        self._t0 = time.time()

    def log(self, step: int, metrics: dict, *, advance: int = 1, show: bool = True):
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time() - self._t0, 3),
               **{k: (float(v) if isinstance(v, (int, float)) else v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in metrics.items():
                if isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, step)
        if self.bar is not None:
            if show:
                keys = [k for k in ("loss", "reward_acc", "accuracy", "kl", "margin", "tokens_per_s") if k in metrics]
                self.bar.set_postfix({k: f"{metrics[k]:.4g}" for k in keys}, refresh=False)
            self.bar.update(advance)

    def advance(self, n: int = 1):
        if self.bar is not None:
            self.bar.update(n)

    def close(self, plot: bool = True) -> Path | None:
        if not self.enabled:
            return None
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        return plot_curves(self.path, self.run_dir / "curves.png") if plot else None


def read_metrics(path) -> list[dict]:
    path = Path(path)
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []


def plot_curves(metrics_path, png_path, skip=("step", "time", "lr", "tokens_per_s")) -> Path | None:
    """One panel per logged numeric metric against the step (matplotlib, Agg backend)."""
    rows = read_metrics(metrics_path)
    keys = []
    for r in rows:
        keys += [k for k, v in r.items() if k not in skip and k not in keys and isinstance(v, (int, float))]
    if not rows or not keys:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(png_path, dpi=80)
    plt.close(fig)
    return Path(png_path)
