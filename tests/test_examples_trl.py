"""The TRL and Hugging Face examples run end to end (2 steps each, in their own processes)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("script,expect", [("examples/trl_grpo.py", "fastalign head"),
                                           ("examples/trl_dpo.py", "fastalign head"),
                                           ("examples/grpo_loop.py", "step   1")])
def test_example_runs(script, expect):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    args = ["--steps", "2"]
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert expect in proc.stdout
