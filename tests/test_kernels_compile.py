"""Compile every Triton kernel ahead of time for NVIDIA GPUs, down to a cubin, without a GPU.

The interpreter executes kernels with numpy and forgives what the compiler
does not (non-constexpr globals, loop-carried type changes, bad casts); this
compiles each kernel variant the launchers use for Hopper and Ampere targets
with Triton's bundled ptxas, so such mistakes surface here.
"""

import itertools

import pytest

from mmtts.kernels.dispatch import interpreting

triton = pytest.importorskip("triton")
pytestmark = pytest.mark.skipif(interpreting(), reason="kernels are interpreter objects when TRITON_INTERPRET=1")

TARGETS = [("cuda", 90, 32), ("cuda", 80, 32)]


def _compile(kernel, signature, constexprs, target):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    signature = {**signature, **{name: "constexpr" for name in constexprs}}
    compiled = triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget(*target))
    assert compiled.asm["cubin"], f"no cubin for {fn.__name__}"


def _variants(full: bool):
    """(kernel, signature, constexprs) triples; ``full`` crosses every dtype with every constexpr switch."""
    from mmtts.kernels import denoise_triton, norm_triton, philox_triton

    denoise = [("fp32", True, False, True), ("bf16", False, True, True), ("fp16", False, False, False)]
    if full:
        denoise = [v for v in itertools.product(("fp32", "bf16", "fp16"), (False, True), (False, True), (False, True))
                   if not (v[1] and v[2])]
    for dtype, has_z, draw, write_x0 in denoise:
        ptr = f"*{dtype}"
        yield (denoise_triton._denoise_kernel,
               {"x_ptr": ptr, "out_ptr": ptr, "z_ptr": ptr if has_z else "*fp32", "seed_ptr": "*i64",
                "offset_ptr": "*i64", "coef_ptr": "*fp32", "next_ptr": ptr, "x0_ptr": ptr, "numel": "i32",
                "batch": "i32"},
               {"HAS_Z": has_z, "DRAW_Z": draw, "WRITE_X0": write_x0, "QUADS": 512})
    yield philox_triton._noise_kernel, {"out_ptr": "*fp32", "seed_ptr": "*i64", "offset_ptr": "*i64",
                                        "numel": "i64"}, {"QUADS": 256}
    sizes = {"N": "i32", "C": "i32", "L": "i32", "rows_per_chunk": "i32"}
    tiles = [{"BLOCK_R": 1, "BLOCK_L": 2048}, {"BLOCK_R": 2048, "BLOCK_L": 1}, {"BLOCK_R": 32, "BLOCK_L": 64}]
    for dtype, tile in itertools.product(("fp32", "bf16") if full else ("bf16",), tiles if full else tiles[2:]):
        yield norm_triton._stats_kernel, {"x_ptr": f"*{dtype}", "mean_ptr": "*fp32", "m2_ptr": "*fp32", **sizes}, \
            tile
        yield norm_triton._grad_sums_kernel, {"dy_ptr": f"*{dtype}", "x_ptr": f"*{dtype}", "mean_ptr": "*fp32",
                                              "rstd_ptr": "*fp32", "sdy_ptr": "*fp32", "sdyx_ptr": "*fp32",
                                              **sizes}, tile
        for has_v in (False, True):
            yield norm_triton._channel_affine_kernel, {"u_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "p_ptr": "*fp32",
                                                       "q_ptr": "*fp32", "r_ptr": "*fp32", "out_ptr": f"*{dtype}",
                                                       "R": "i32", "C": "i32", "L": "i32"}, \
                {"HAS_V": has_v, "BLOCK_R": 2 * tile["BLOCK_R"], "BLOCK_L": tile["BLOCK_L"]}
    finalize_ptrs = ("pmean_ptr", "pm2_ptr", "smean_ptr", "svar_ptr", "w_ptr", "b_ptr", "bmean_ptr", "bvar_ptr",
                     "mean_ptr", "rstd_ptr", "scale_ptr", "shift_ptr")
    backward_ptrs = ("sdy_ptr", "sdyx_ptr", "w_ptr", "rstd_ptr", "bmean_ptr", "smean_ptr", "db_ptr", "dw_ptr", "p_ptr",
                     "q_ptr", "r_ptr")
    for use_batch, exact_mix in ((True, True), (False, False)) + (((True, False),) if full else ()):
        yield (norm_triton._backward_coefficients_kernel,
               {**{p: "*fp32" for p in backward_ptrs}, "C": "i32", "nchunks": "i32", "count": "fp32",
                "alpha": "fp32"},
               {"USE_BATCH": use_batch, "EXACT_MIX": exact_mix, "BLOCK_C": 32, "CHUNKS": 128})
    finalize = [(False, True, False), (True, True, True)]
    if full:
        finalize += [(False, True, True), (True, False, True)]
    for mix, exact, affine in finalize:
        yield (norm_triton._finalize_kernel,
               {**{p: "*fp32" for p in finalize_ptrs}, "C": "i32", "total": "i64", "chunk": "i32", "nchunks": "i32",
                "alpha": "fp32", "eps": "fp32"},
               {"MIX": mix, "EXACT": exact, "AFFINE": affine, "BLOCK_C": 32, "CHUNKS": 128})


def test_kernels_compile_for_hopper():
    for kernel, signature, constexprs in _variants(full=False):
        _compile(kernel, signature, constexprs, TARGETS[0])


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS, ids=lambda t: f"sm{t[1]}")
def test_every_kernel_variant_compiles(target):
    for kernel, signature, constexprs in _variants(full=True):
        _compile(kernel, signature, constexprs, target)
