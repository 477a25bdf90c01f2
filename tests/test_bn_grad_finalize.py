"""bn_grad_finalize on every backend against densenet_fast.ops.reference: in place on channel
slices (odd offsets) of NCHW and channels_last gradient buffers, the channels around the slice
untouched; with a BN's factors applied to its reductions."""
import pytest
import torch

from helpers import LAYOUTS, check_op, op_cases, op_tensor, seeded

# (N, C, H, W, channel offset of the views)
SHAPES = [(2, 23, 7, 3, 3), (1, 5, 3, 5, 3), (2, 37, 13, 11, 7), (3, 11, 5, 4, 1)]
# Per-channel arithmetic in float32 (float64 for float64), rounded once: "stats"; a bfloat16 result is
# rounded to bfloat16 (2**-8 relative): "finalize".
TOLERANCE_KIND = {torch.float64: "stats", torch.float32: "stats", torch.float16: "stats", torch.bfloat16: "finalize"}


@pytest.mark.parametrize("factors", [False, True], ids=["plain", "factors"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case, shape", op_cases(TOLERANCE_KIND, SHAPES))
def test_bn_grad_finalize(case, shape, layout, factors):
    n, c, h, w, offset = shape
    x = op_tensor((n, c, h, w), case, layout, seed=10, offset=offset)
    grad = op_tensor((n, c, h, w), case, layout, seed=11, offset=offset + 1)
    center, coef_x, coef_c, fx, fc = (seeded(c, s).to(device=case.device, dtype=case.stats_dtype)
                                      for s in range(12, 17))
    check_op(case, "bn_grad_finalize", grad, x, center, coef_x, coef_c, (fx, fc) if factors else None)
