"""bn_relu_pool_conv1x1 (the transition) and its backward on every backend against
densenet_fast.ops.reference: whole NCHW and channels_last buffers and channel slices of them, odd
heights and widths (the last row/column feeds no pooling window), with CoefsFrom; the backward's
input gradient (written, zero on an odd map's last row/column, or accumulated), weight gradient and
BN reductions, with CoefSums."""
import pytest
import torch

from densenet_fast.ops.interface import CoefsFrom, CoefSums
from helpers import LAYOUTS, check_op, op_cases, seeded
from test_bn_relu_conv1x1 import MODES, backward_inputs, bn_affine_parameters, check_backward, forward_inputs

# (N, C_in, C_out, H, W, channel offset of the views): batch 1, odd sizes, a 2 x 3 map, several K
# and output tiles (70 > 32 input channels).
SHAPES = [(1, 13, 7, 7, 5, 3), (3, 37, 7, 9, 11, 3), (2, 10, 7, 8, 6, 3), (1, 13, 6, 5, 7, 0), (2, 19, 9, 2, 3, 0),
          (2, 70, 35, 17, 18, 0)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case, shape", op_cases("op", SHAPES))
def test_bn_relu_pool_conv1x1(case, shape, layout):
    x, scale, shift, _, weight = forward_inputs(case, shape, layout, seed=40)
    check_op(case, "bn_relu_pool_conv1x1", x, scale, shift, weight)


@pytest.mark.parametrize("case, shape", op_cases("op", [(2, 70, 20, 9, 11, 0)]))
def test_computes_its_coefficients_from_statistics(case, shape):
    """CoefsFrom as in bn_relu_conv1x1: the transition's scale and shift computed first (in the
    Triton kernel, over several K tiles and programs) and written into the block the backward reads."""
    x, _, _, _, weight = forward_inputs(case, shape, "nchw_view", seed=4)
    c_in = shape[1]
    mean = (0.3 * seeded(c_in, 5)).to(device=case.device, dtype=case.stats_dtype)
    invstd = (seeded(c_in, 6).abs() + 0.5).to(device=case.device, dtype=case.stats_dtype)
    bn_weight, bn_bias = bn_affine_parameters(c_in, case, "weight_and_bias", seed=7)
    coefs = torch.full((2, c_in), float("nan"), device=case.device, dtype=case.stats_dtype)
    _, (*_, coefs_from) = check_op(case, "bn_relu_pool_conv1x1", x, coefs[0], coefs[1], weight,
                                   CoefsFrom(mean, invstd, bn_weight, bn_bias, coefs))
    scale = invstd.double() * bn_weight.double()
    exact = 1e-6 if case.stats_dtype == torch.float32 else 1e-12
    shift = bn_bias.double() - mean.double() * scale
    torch.testing.assert_close(coefs_from.coefs.double(), torch.stack([scale, shift]), atol=exact, rtol=exact)


# ---- backward ------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case, shape", op_cases("op", SHAPES + [(2, 9, 8, 7, 9, 0)]))
def test_bn_relu_pool_conv1x1_backward(case, shape, layout, mode):
    accumulate, need_weight_grad = MODES[mode]
    inputs = backward_inputs(case, shape, layout, 1, accumulate, seed=70, pooled=True)
    check_backward(case, "bn_relu_pool_conv1x1_backward", inputs, accumulate, need_weight_grad)


@pytest.mark.parametrize("need_weight_grad", [True, False], ids=["weight_grad", "no_weight_grad"])
@pytest.mark.parametrize("case, shape", op_cases("op", [(2, 19, 9, 6, 5, 0)]))
def test_backward_adds_batch_statistics_terms(case, shape, need_weight_grad):
    """The transition's terms: coef_x += fx * sum_dy_xc and coef_c += fc * sum_dy into the rows of
    the block's (2, C) accumulator (in the Triton launch that finishes the sums); the gradient written."""
    inputs = backward_inputs(case, shape, "nchw", 1, False, seed=3, pooled=True)
    c_in = shape[1]
    acc = seeded((2, c_in), 8).to(device=case.device, dtype=case.stats_dtype)
    fx, fc = (seeded(c_in, s).to(device=case.device, dtype=case.stats_dtype) for s in (9, 10))
    check_backward(case, "bn_relu_pool_conv1x1_backward", inputs, False, need_weight_grad,
                   CoefSums(acc[0], acc[1], fx, fc))
