"""bn_relu_conv3x3 (a layer's new channels) and its backward on every backend against
densenet_fast.ops.reference: new channels written into an odd-offset channel slice of an NCHW or
channels_last feature buffer (nothing around it written), with and without dropout's noise, with
statistics (returned, or written into a StatsOut); maps of at most 2x2 pixels (the cpp CPU
small-map GEMM; the center tap alone for 1x1); the backward's bottleneck gradient (written or
accumulated), weight gradient (exactly zero for taps that only meet padding) and BN reductions,
from a gradient that is a strided slice of the block's gradient buffer."""
import pytest
import torch

from densenet_fast.ops.interface import StatsOut
from helpers import LAYOUTS, bn_vectors, check_op, conv_weight, op_cases, op_tensor
from test_bn_relu_conv1x1 import AFFINES, MODES, backward_inputs, bn_affine_parameters, check_backward
from test_channel_stats import EPS, packed_rows

# (N, bottleneck channels, new channels k, H, W, channel offset of the bottleneck's views): maps of
# at most 2x2 pixels, batch 1, 1-pixel-wide maps, odd sizes, two pixel tiles (9 x 11 > 64), two
# input-channel blocks (40 > 32), k not a multiple of 8.
SHAPES = [(3, 14, 5, 9, 7, 3), (3, 14, 5, 1, 1, 3), (3, 14, 5, 2, 2, 0), (3, 14, 5, 2, 1, 3), (3, 14, 5, 1, 2, 0),
          (1, 12, 5, 5, 7, 0), (2, 19, 4, 1, 6, 3), (2, 40, 13, 9, 11, 0)]
OUT_OFFSET = 7  # where the new channels go in the feature buffer: an odd channel offset, 3 channels after


def forward_inputs(case, shape, layout, seed=30, noise=False):
    n, c, k, h, w, offset = shape
    z = op_tensor((n, c, h, w), case, layout, seed, offset=offset)
    scale, shift, _ = bn_vectors(c, case, seed + 1)
    weight = conv_weight(k, c, 3, case, seed + 2)
    buf = op_tensor((n, OUT_OFFSET + k + 3, h, w), case, layout.removesuffix("_view"), seed + 3)
    mask = None
    if noise:
        keep = torch.rand((n, k, h, w), generator=torch.Generator().manual_seed(seed + 4)) > 0.3
        mask = (keep.to(torch.float64) / 0.7).to(device=case.device, dtype=case.dtype)
    return z, scale, shift, weight, buf[:, OUT_OFFSET:OUT_OFFSET + k], mask


@pytest.mark.parametrize("with_noise", [False, True], ids=["plain", "noise"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case, shape", op_cases("op", SHAPES))
def test_bn_relu_conv3x3(case, shape, layout, with_noise):
    z, scale, shift, weight, out, noise = forward_inputs(case, shape, layout, noise=with_noise)
    for with_stats in (True, False):
        (mean, var), _ = check_op(case, "bn_relu_conv3x3", z, scale, shift, weight, out, noise, with_stats)
        assert (mean is None and var is None) != with_stats


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("case, shape", op_cases("op", [(3, 13, 11, 5, 7, 2)]))
def test_statistics_and_coefficients_written_in_place(case, shape, affine):
    """A StatsOut's rows and the next BN's coefficients, written in place (see test_bn_relu_conv1x1)."""
    z, scale, shift, weight, out, _ = forward_inputs(case, shape, "nchw_view", seed=1)
    bn_weight, bn_bias = bn_affine_parameters(shape[2], case, affine, seed=5)
    _, rows, coefs = packed_rows(shape[2], case, seed=7, coefs=True)
    result, _ = check_op(case, "bn_relu_conv3x3", z, scale, shift, weight, out, None, True,
                         StatsOut(rows, EPS, coefs, bn_weight, bn_bias))
    assert result == (None, None)


@pytest.mark.parametrize("case, shape", op_cases("op", [(2, 6, 5, 4, 3, 0)]))
def test_statistics_only_leave_the_coefficients_alone(case, shape):
    """A StatsOut without coefficients: the rows written, and nothing else of the packed numbers
    (the coefficient block included)."""
    z, scale, shift, weight, out, _ = forward_inputs(case, shape, "nchw", seed=11)
    _, rows = packed_rows(shape[2], case, seed=15)
    check_op(case, "bn_relu_conv3x3", z, scale, shift, weight, out, None, True, StatsOut(rows, EPS))


# ---- backward ------------------------------------------------------------------------------------

# (N, bottleneck channels, k, H, W, channel offset of the views); the last takes about 5 s a case
# under Triton's interpreter.
BACKWARD_SHAPES = [(1, 13, 6, 7, 5, 3), (3, 37, 6, 9, 11, 3), (2, 9, 6, 7, 9, 0), (1, 12, 5, 5, 7, 0),
                   (2, 19, 4, 1, 6, 3), (2, 70, 13, 9, 11, 0)]
# Maps of at most 2x2 pixels take the cpp CPU small-map GEMMs.
SMALL_MAPS = [(5, 21, 6) + hw + (0,) for hw in [(1, 1), (2, 2), (2, 1), (1, 2)]]
GRAD_OUT_OFFSET = 5  # the layer's new channels' gradient: a strided slice of the block's gradient buffer


def _slow(case, shape):
    return case.backend == "triton" and shape[1] >= 70


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case, shape", op_cases("op", BACKWARD_SHAPES + SMALL_MAPS, slow=_slow))
def test_bn_relu_conv3x3_backward(case, shape, layout, mode):
    accumulate, need_weight_grad = MODES[mode]
    inputs = backward_inputs(case, shape, layout, 3, accumulate, seed=60, grad_out_offset=GRAD_OUT_OFFSET)
    check_backward(case, "bn_relu_conv3x3_backward", inputs, accumulate, need_weight_grad)


@pytest.mark.parametrize("accumulate", [False, True], ids=["write", "accumulate"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case, shape", op_cases("op", SMALL_MAPS))
def test_weight_gradient_of_small_maps(case, shape, layout, accumulate):
    """The weight gradient of a map of at most 2x2 pixels: exactly zero for the taps that only meet
    padding, nonzero for the others (and the same gradients as the 3x3 convolution otherwise)."""
    inputs = backward_inputs(case, shape, layout, 3, accumulate, seed=90)
    grads, _ = check_backward(case, "bn_relu_conv3x3_backward", inputs, accumulate, True)
    hw = shape[3:5]
    taps = torch.arange(3)
    meets_pixels = ((taps - 1).abs() < hw[0]).view(3, 1) & ((taps - 1).abs() < hw[1]).view(1, 3)
    if not meets_pixels.all():
        assert grads.grad_weight[:, :, ~meets_pixels.to(grads.grad_weight.device)].abs().max() == 0
    assert (grads.grad_weight[:, :, meets_pixels.to(grads.grad_weight.device)].abs().amax(dim=(0, 1)) > 0).all()


@pytest.mark.slow
@pytest.mark.parametrize("need_weight_grad", [False, True], ids=["no_weight_grad", "weight_grad"])
@pytest.mark.parametrize("case, shape", op_cases("op", [(3, 8, 4, 300, 300, 0)], dtypes=(torch.float64,),
                                                 backends=("torch", "cpp", "composite")))
def test_backward_over_several_chunks(case, shape, need_weight_grad):
    """A batch over several chunks of images: the cpp CPU op takes both gradients a chunk at a time
    (1M elements: one 720K-element image here), as the torch and composite backends do theirs."""
    inputs = backward_inputs(case, shape, "nchw", 3, True, seed=95)
    check_backward(case, "bn_relu_conv3x3_backward", inputs, True, need_weight_grad)
