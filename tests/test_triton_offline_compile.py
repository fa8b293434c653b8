"""The GPU Triton kernels compile for sm_90 on this CPU machine, with 64-bit offsets and few spills.

The interpreter runs the kernels' arithmetic but never compiles them: a kernel that does not
compile, an offset product computed in 32 bits (wrapping past 2^31 elements) or a config that
spills heavily would only show on a GPU. tests/triton_offline_compile.py compiles each kernel's
default config (the one FASTALIGN_AUTOTUNE=0 runs) with Triton's own toolchain and reports them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("triton_offline_compile.py")


@pytest.fixture(scope="module")
def reports():
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def test_every_kernel_compiles_for_sm90(reports):
    names = {r["kernel"].split()[0] for r in reports}
    assert names == {"_lse_forward_kernel", "_dlogits_chunk_kernel", "_dhidden_accumulate_kernel",
                     "_dweight_chunk_kernel", "_steer_kernel"}


def test_no_stride_product_in_32_bits(reports):
    for r in reports:
        assert not r["i32_stride_products"], f"{r['kernel']}: 32-bit offset products {r['i32_stride_products']}"


def test_default_configs_spill_little(reports):
    for r in reports:
        assert r["spill_store_bytes"] <= 512, f"{r['kernel']}: {r['spill_store_bytes']} bytes of spill stores"
