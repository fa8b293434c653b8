"""Run folders: threads and seeds, ``runs/<name>/`` with its ``config.yaml``, and the final ``eval.json``."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from .config import save_config
from .distributed import DistState, barrier, broadcast_object, init_distributed


def seed_everything(seed: int):
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:
        pass


def start_run(cfg, flow: str) -> tuple[DistState, Path]:
    """Join torchrun if launched by it, fix threads and seeds, create the run folder and save the config."""
    state = init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    if not cfg.name:
        cfg.name = broadcast_object(f"{flow}-{time.strftime('%Y%m%d-%H%M%S')}", state)
    run_dir = Path(cfg.output_dir) / cfg.name
    if state.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir, echo=cfg.progress)
    barrier(state)
    return state, run_dir


def write_json(path, data) -> Path:
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)
    return path
