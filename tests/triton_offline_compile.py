"""Compile the GPU Triton kernels for sm_90 without a GPU and report what only a compiler shows.

Run as a script (never under TRITON_INTERPRET=1, which replaces compilation with the interpreter):

    python tests/triton_offline_compile.py [--all-configs]

For each kernel and config it prints one JSON line: registers, spill bytes (from ``ptxas -v`` on
the generated PTX), and the 32-bit multiplies that involve a stride in the Triton IR (an offset
that can wrap past 2^31). tests/test_triton_offline_compile.py runs it on the default configs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
from fastalign.triton_kernels import steering, token_logprobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
POINTER_TYPES = {"labels_ptr": "*i64", "keep_ptr": "*i8", "kept_ptr": "*i32", "count_ptr": "*i32", "order_ptr": "*i32"}
BF16_POINTERS = {"h_ptr", "w_ptr", "b_ptr", "dz_ptr", "dw_ptr"}
FLOAT_SCALARS = {"inv_temp", "eps", "alpha", "temperature", "top_p"}


def _jit(fn):
    while not isinstance(fn, triton.runtime.jit.JITFunction):
        fn = fn.fn
    return fn


def _signature(fn, constexprs):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = POINTER_TYPES.get(name, "*bf16" if name in BF16_POINTERS else "*fp32")
        elif name in FLOAT_SCALARS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"  # strides and sizes as Triton specializes values < 2^31
    return sig


def _ptxas_report(ptx: str) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90)
    path = ptxas.path if hasattr(ptxas, "path") else ptxas[0]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run([path, "-v", "-arch=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True)
    finally:
        os.unlink(f.name)
    text = out.stdout + out.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spill = [int(x) for x in re.findall(r"(\d+) bytes spill stores", text)]
    return {"registers": int(regs.group(1)) if regs else None, "spill_store_bytes": sum(spill)}


def compile_one(kernel, constexprs, name):
    fn = _jit(kernel)
    options = {k: constexprs.pop(k) for k in ("num_warps", "num_stages") if k in constexprs}
    src = triton.compiler.ASTSource(fn=fn, signature=_signature(fn, constexprs), constexprs=constexprs)
    compiled = triton.compile(src, target=TARGET, options=options)
    ttir = compiled.asm["ttir"]
    narrow = [line.strip() for line in ttir.splitlines()
              if "arith.muli" in line and "stride" in line and line.rstrip().split(":")[-1].split()[0] == "i32"]
    report = {"kernel": name, "shared_bytes": compiled.metadata.shared, "i32_stride_products": narrow}
    report.update(_ptxas_report(compiled.asm["ptx"]))
    return report


def cases(all_configs: bool):
    k = token_logprobs
    common = {"UPCAST": False, "IEEE": False}
    kernels = [
        (k._lse_forward_kernel, {"HAS_BIAS": True, **common}),
        (k._dlogits_chunk_kernel, {"HAS_BIAS": True, "HAS_G_ENT": True, "FILTER": True, "SORTED": True, **common,
                                   "BLOCK_N": k.FLAG_BLOCK_N, "BLOCK_V": k.FLAG_BLOCK_V}),
        (k._dhidden_accumulate_kernel, {"FILTER": True, "SORTED": True, **common, "BLOCK_N": k.FLAG_BLOCK_N,
                                        "BLOCK_V": k.FLAG_BLOCK_V}),
        (k._dweight_chunk_kernel, {"HAS_DW": True, "HAS_BIAS": True, "FILTER": True, "SORTED": True, **common,
                                   "BLOCK_N": k.FLAG_BLOCK_N, "BLOCK_V": k.FLAG_BLOCK_V}),
    ]
    for kernel, fixed in kernels:
        configs = kernel.configs if all_configs else kernel.configs[:1]
        for config in configs:
            constexprs = {**fixed, **config.kwargs, "num_warps": config.num_warps, "num_stages": config.num_stages}
            yield kernel, constexprs, f"{_jit(kernel).__name__} {config}"
    yield (steering._steer_kernel, {"MASKED": True, "BLOCK_V": 4096, "SEARCH_BLOCK": 512, "NUM_CAND": 16,
                                    "num_warps": 8}, "_steer_kernel")


def main():
    all_configs = "--all-configs" in sys.argv
    for kernel, constexprs, name in cases(all_configs):
        print(json.dumps(compile_one(kernel, dict(constexprs), name)), flush=True)


if __name__ == "__main__":
    main()
