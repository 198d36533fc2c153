"""The Triton kernels compile for an H100/H200 (sm_90) here, without a GPU: Triton's own ptxas
builds the cubin. The interpreter runs code that the GPU compiler rejects (e.g. a constexpr
branch that returns a tensor of another shape than the code after it), so this is the check
that the GPU benchmark will at least start. Marked slow: a few seconds per kernel variant."""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")

pytestmark = pytest.mark.slow

if os.environ.get("TRITON_INTERPRET") == "1":  # the kernels are interpreter objects then
    pytest.skip("TRITON_INTERPRET=1: nothing to compile", allow_module_level=True)

try:
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
except ImportError:  # pragma: no cover - another Triton layout
    pytest.skip("this Triton has no ASTSource / GPUTarget", allow_module_level=True)

if not os.path.exists(os.path.join(os.path.dirname(triton.__file__),
                                   "backends", "nvidia", "bin", "ptxas")):
    pytest.skip("Triton's bundled ptxas is not here", allow_module_level=True)

from probe.runtime import permute, quant_gemm  # noqa: E402

SM90 = GPUTarget("cuda", 90, 32)


def _compile(fn, types: dict, constants: dict, *, aligned=(), num_warps=4, num_stages=3):
    """Compile fn for sm_90: types name -> Triton type of each runtime argument, constants the
    constexpr values, aligned the arguments a launch would see as multiples of 16."""
    signature = {**types, **dict.fromkeys(constants, "constexpr")}
    names = list(signature)
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    return triton.compile(ASTSource(fn, signature, constants, attrs), target=SM90,
                          options={"num_warps": num_warps, "num_stages": num_stages})


def test_permutation_kernels_compile_for_sm90():
    e_pad, block = 128, 64
    _compile(permute._count_kernel, {"ids_ptr": "*i64", "counts_ptr": "*i32", "n": "i32"},
             {"E_PAD": e_pad, "BLOCK": block})
    _compile(permute._scan_kernel, {"counts_ptr": "*i32", "base_ptr": "*i32",
                                    "offs_ptr": "*i32", "num_blocks": "i32", "E": "i32"},
             {"E_PAD": e_pad, "CB": 64})
    types = {"ids_ptr": "*i64", "base_ptr": "*i32", "x_ptr": "*bf16", "rows_ptr": "*bf16",
             "token_ptr": "*i64", "slot_ptr": "*i64", "inv_ptr": "*i64", "n": "i32", "D": "i32",
             "K": "i32", "stride_x": "i32", "stride_rows": "i32"}
    _compile(permute._place_kernel, types, {"E_PAD": e_pad, "BLOCK": block, "BD": 1024,
                                            "GATHER": True},
             aligned=("x_ptr", "rows_ptr", "stride_x", "stride_rows"))
    _compile(permute._combine_kernel, {"y_ptr": "*bf16", "inv_ptr": "*i64", "w_ptr": "*fp32",
                                       "out_ptr": "*bf16", "D": "i32", "K": "i32",
                                       "stride_y": "i32", "stride_out": "i32"}, {"BD": 1024})


# (format, decode, row tiles, swap, gather x rows, bias, BM, BK divides K): every code path
# at least once
GEMMS = [
    ("mxfp4", "portable", 4, False, False, False, 32, True),
    ("mxfp4", "spread", 2, True, True, True, 32, False),
    ("mxfp4", "dot_scaled", 1, True, False, False, 16, True),
    ("mxfp4", "dot_scaled", 2, False, True, True, 64, False),
    ("mxfp4", "bits", 1, True, True, True, 16, False),
    ("mxfp4", "bits", 2, False, False, False, 64, True),
    ("mxfp4", "lut", 1, True, True, True, 16, True),
    ("mxfp4", "lut", 4, False, True, False, 64, False),
    ("fp8_block", "product", 2, True, False, True, 32, False),
    ("bf16", None, 1, True, True, False, 32, True),
]


@pytest.mark.parametrize("fmt, decode, rows, swap, gather, bias, bm, even_k", GEMMS)
def test_grouped_gemm_variants_compile_for_sm90(fmt, decode, rows, swap, gather, bias, bm,
                                                even_k):
    cfg = quant_gemm.KernelConfig(block_m=bm, block_n=128, block_k=128,
                                  mxfp4_decode=decode if fmt == "mxfp4" else "portable",
                                  fp8_scale=decode if fmt == "fp8_block" else "product",
                                  row_tiles=rows, swap_ab=swap)
    types, aligned = quant_gemm.kernel_arg_types(fmt)
    constants = quant_gemm.kernel_constants(fmt, cfg, 8, 256 if even_k else 2880,
                                            gather=gather, bias=bias)
    kernel = _compile(quant_gemm._grouped_kernel, types, constants, aligned=aligned)
    ptx = kernel.asm["ptx"]
    # the product runs on the tensor cores: Hopper's wgmma where a warp group's M side is 64
    assert "wgmma.mma_async" in ptx or "mma.sync" in ptx
    if swap or bm >= 64:
        assert "wgmma.mma_async" in ptx
    if decode == "lut":  # the byte-permute decode's PTX assembled, its scale a bf16x2 product
        assert ptx.count("prmt.b32") >= 10 and "mul.rn.bf16x2" in ptx
    if decode == "bits":  # the scale multiplies bf16 pairs: no weight goes through fp32
        assert "mul.bf16x2" in ptx and "mul.f32" not in ptx and "e4m3" not in ptx


def test_moe_layer_tune_candidates_compile_for_sm90_and_fit_shared_memory():
    """Every config that experiments/runtime/moe_layer.py --tune tries compiles for sm_90 as the
    layer launches it (gate/up: rows gathered through the index, with a bias; down: neither,
    as for qwen3), runs its product on wgmma, and fits one H100/H200 SM's shared memory
    (227 KB per block), so no candidate is lost to a launch error on the GPU; and, where
    Triton's cuobjdump is here, none spills registers to the stack."""
    import subprocess
    import tempfile

    from experiments.runtime.moe_layer import TUNE_CANDIDATES

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")

    types, aligned = quant_gemm.kernel_arg_types("bf16")
    for cfg in TUNE_CANDIDATES:
        for gather_and_bias in (True, False):
            constants = quant_gemm.kernel_constants("bf16", cfg, 128, 4096,  # qwen3's K
                                                    gather=gather_and_bias, bias=gather_and_bias)
            kernel = _compile(quant_gemm._grouped_kernel, types, constants, aligned=aligned,
                              num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            assert "wgmma.mma_async" in kernel.asm["ptx"], cfg.label()
            assert kernel.metadata.shared <= 227 * 1024, (cfg.label(), kernel.metadata.shared)
            if not os.path.exists(cuobjdump):
                continue
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "kernel.cubin")
                with open(path, "wb") as f:
                    f.write(kernel.asm["cubin"])
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", path],
                                       capture_output=True, text=True, check=True).stdout
            assert " STACK:0 " in usage and "REG:" in usage, (cfg.label(), usage)


def test_quant_sass_counts_fewer_loop_instructions_for_the_integer_decodes(tmp_path):
    """experiments/runtime/quant_sass.py --quick compiles one config per variant for sm_90 and
    reads its K loop: "bits" and "lut" run well under 60% of "portable"'s instructions per
    weight, with no conversion instruction and no spill; the report's files are written."""
    import json

    from experiments.runtime import quant_sass

    assert quant_sass.main(["--out", str(tmp_path), "--quick"]) == 0
    rows = {r["decode"]: r for r in json.loads((tmp_path / "quant_sass.json").read_text())["rows"]
            if r["format"] == "mxfp4"}
    assert set(rows) == {"portable", "bits", "lut"}
    for decode in ("bits", "lut"):
        row = rows[decode]
        assert row["per_weight"] < 0.6 * rows["portable"]["per_weight"], (decode, row)
        assert row["mix_per_weight"].get("convert", 0) == 0 and row["stack_bytes"] == 0
        assert row["estimate"]["256"]["issue_bound_us"] > 0
    assert rows["portable"]["mix_per_weight"]["convert"] >= 1  # e4m3 -> f16 -> f32 -> bf16
    assert "| mxfp4 | lut |" in (tmp_path / "quant_sass.md").read_text()
    assert (tmp_path / "quant_sass.manifest.json").exists()


def test_quant_layer_integer_decode_configs_fit_an_sm90_sm():
    """Every "bits" / "lut" config that experiments/runtime/quant_layer.py times compiles for
    sm_90 (as gpt-oss-120b's gate/up launch: K 2880, so the BK 128 ones mask every step),
    spills no register and fits one SM's shared memory (227 KB a program). The transposed
    ones hand the decoded tile to wgmma's register operand through shared memory (ldmatrix)
    unless permute_k decodes it in that layout."""
    from experiments.runtime import quant_layer, quant_sass

    specs = [s for s in quant_layer.CONFIGS["mxfp4"] if s[5] in ("bits", "lut")]
    assert len(specs) >= 10
    assert sum(quant_layer.kernel_config(s, "mxfp4").permute_k for s in specs) >= 4
    for spec in specs:
        cfg = quant_layer.kernel_config(spec, "mxfp4")
        kernel = quant_sass._compile(cfg, "mxfp4")
        usage = quant_sass._cuobjdump(kernel.asm["cubin"], "--dump-resource-usage")
        assert " STACK:0 " in usage, (cfg.label(), cfg.mxfp4_decode, usage)
        assert kernel.metadata.shared <= 227 * 1024, (cfg.label(), kernel.metadata.shared)
        if cfg.swap_ab:
            assert "wgmma.mma_async" in kernel.asm["ptx"], cfg.label()
            assert ("ldmatrix" in kernel.asm["ptx"]) != cfg.permute_k, (cfg.label(),
                                                                         cfg.mxfp4_decode)
