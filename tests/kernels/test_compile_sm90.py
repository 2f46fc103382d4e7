"""Every kernel compiles for an H100 (sm_90) with Triton's bundled ptxas, no GPU needed.

The interpreter runs kernels as Python and misses errors only the compiler sees (non-constexpr globals,
loop-carried type changes, dot shape/dtype rules, shared-memory overflow of a config). The compile runs in a
subprocess because this test session imports the kernels in interpreter mode."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

# (kernel, dtype of the student tensors, constexprs[, argument types]); every other argument is typed by its name.
# Kernels with a UNIT_TAU switch are compiled both ways (tau == 1: one exp2 per logit).
KERNELS = [
    ("kd_loss._kd_fwd_kernel", "bf16", dict(HAS_RANK=True, BLOCK_T=4, BLOCK_K=64, BLOCK_C=2048)),
    ("kd_loss._kd_bwd_kernel", "bf16", dict(BLOCK_N=256, CHUNK_N=16, BLOCK_C=2048)),
    ("kd_loss._kd_lse_split_kernel", "bf16", dict(BLOCK_C=2048)),
    ("kd_loss._kd_terms_kernel", "bf16", dict(HAS_RANK=True, BLOCK_S=8, BLOCK_T=4, BLOCK_K=64)),
    ("kd_loss_linear._lin_lse_kernel", "fp32", dict(HAS_BIAS=True, D_PAD=128, DOT_PREC="tf32x3", BLOCK_B=32, BLOCK_C=64)),
    ("kd_loss_linear._lin_terms_kernel", "bf16",
     dict(HAS_BIAS=True, HAS_RANK=True, BLOCK_S=64, BLOCK_T=4, BLOCK_K=64, BLOCK_D=32)),
    ("kd_loss_linear._lin_entries_kernel", "bf16", dict(BLOCK_N=128), dict(eid_ptr="*i64")),
    ("kd_loss_linear._lin_grad_user_kernel", "bf16", dict(HAS_BIAS=False, D_PAD=128, DOT_PREC="tf32", BLOCK_B=64, BLOCK_C=128)),
    ("kd_loss_linear._lin_grad_item_kernel", "fp32",
     dict(HAS_BIAS=True, D_PAD=128, DOT_PREC="tf32x3", GRANULE=16, CHUNK=32, BLOCK_B=32, BLOCK_C=64)),
    # the catalog-parallel local part: bf16 shards get fp32 gradients from the same item kernel
    ("kd_loss_linear._lin_grad_item_kernel", "bf16",
     dict(HAS_BIAS=True, D_PAD=64, DOT_PREC="tf32", GRANULE=16, CHUNK=32, BLOCK_B=64, BLOCK_C=128),
     dict(de_ptr="*fp32", dbias_ptr="*fp32")),
    ("kd_catalog_local._sel_logits_kernel", "bf16", dict(HAS_BIAS=True, BLOCK_M=64, BLOCK_D=32)),
]
SHARED_MEMORY_LIMIT = 232448  # bytes of shared memory per block on an H100


def _arg_type(name: str, dtype: str) -> str:
    if name in ("logits_ptr", "grad_ptr", "u_ptr", "e_ptr", "bias_ptr", "de_ptr", "dbias_ptr"):
        return f"*{dtype}"
    if name in ("target_ptr", "ids_ptr", "entry_item_ptr", "entry_row_ptr", "bounds_ptr"):
        return "*i64"
    if name.endswith("_ptr"):
        return "*fp32"
    if name.startswith("stride"):
        return "i64"
    if name in ("tau", "lambda_ce", "lambda_kd", "lambda_rank"):
        return "fp32"
    return "i32"


def _compile_all() -> None:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    target = GPUTarget("cuda", 90, 32)
    for path, dtype, constexprs, *types in KERNELS:
        types = types[0] if types else {}
        module, name = path.split(".")
        kernel = getattr(importlib.import_module(f"prmkd_dist.kernels.{module}"), name)
        fn = kernel.fn if hasattr(kernel, "configs") else kernel  # autotuned kernels wrap the JITFunction
        variants = [dict(UNIT_TAU=u) for u in (False, True)] if "UNIT_TAU" in fn.arg_names else [{}]
        for variant in variants:
            consts = {**constexprs, **variant}
            signature = {a: "constexpr" if a in consts else types.get(a) or _arg_type(a, dtype)
                         for a in fn.arg_names}
            src = ASTSource(fn=fn, signature=signature,
                            constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
            compiled = triton.compile(src, target=target, options=dict(num_warps=4, num_stages=2))
            assert compiled.metadata.shared <= SHARED_MEMORY_LIMIT, f"{path}: {compiled.metadata.shared} B of shared memory"
            print(f"compiled {path} ({dtype}, {variant}): {compiled.metadata.shared} B shared")


@pytest.mark.timeout(300)
def test_kernels_compile_for_sm90():
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # nine entries have the UNIT_TAU switch (the seven that stream the catalog and the two terms kernels, which
    # merge the splits' LSE states); the entries and gather kernels do not
    assert proc.stdout.count("compiled ") == len(KERNELS) + 9, proc.stdout


if __name__ == "__main__":
    _compile_all()
