"""The per-channel BN bookkeeping a backend may do in one launch, on every backend against float64:
bn_coefficients (scale and shift into a (2, C) block of the packed numbers) and bn_grad_finalize
with the BN's factors applied to its reductions."""
import pytest
import torch

from densenet_fast.ops import backend_named
from helpers import TOLERANCES, backend_params

BACKENDS = backend_params("torch", "cpp", "triton")
ATOL, RTOL = TOLERANCES["stats"][torch.float32]  # float32 statistics against float64


def _seeded(*shape, seed, dtype=torch.float32):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("affine", ["weight_and_bias", "strided_weight_and_bias", "weight", "none"])
@pytest.mark.parametrize("channels", [1, 37, 300])
def test_bn_coefficients_match_float64(backend, affine, channels):
    mean = _seeded(channels, seed=1)
    invstd = _seeded(channels, seed=2).abs() + 0.1
    weight = _seeded(2 * channels, seed=3)[::2] if affine != "none" else None  # [::2]: any strides
    bias = _seeded(2 * channels, seed=4)[::2] if "bias" in affine else None
    if affine == "weight_and_bias":
        weight, bias = weight.contiguous(), bias.contiguous()
    packed = _seeded(2 * channels + 7, seed=5)
    before = packed.clone()
    coefs = packed[3:3 + 2 * channels].view(2, channels)
    backend_named(backend).bn_coefficients(mean, invstd, weight, bias, coefs)
    scale = invstd.double() * (1.0 if weight is None else weight.double())
    shift = (0.0 if bias is None else bias.double()) - mean.double() * scale
    torch.testing.assert_close(coefs.double(), torch.stack([scale, shift]), atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(packed[:3], before[:3], atol=0, rtol=0)
    torch.testing.assert_close(packed[3 + 2 * channels:], before[3 + 2 * channels:], atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "channels_last"])
def test_bn_grad_finalize_applies_the_factors(backend, channels_last):
    n, c, h, w = 3, 11, 5, 4
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = _seeded(n, c + 3, h, w, seed=10).contiguous(memory_format=fmt)[:, 1:1 + c]
    grad = _seeded(n, c + 3, h, w, seed=11).contiguous(memory_format=fmt)[:, 2:2 + c]
    center, coef_x, coef_c, fx, fc = (_seeded(c, seed=s) for s in range(12, 17))
    expected = grad.double() + (fx * coef_x).double()[:, None, None] * (x.double() - center.double()[:, None, None]) \
        + (fc * coef_c).double()[:, None, None]
    backend_named(backend).bn_grad_finalize(grad, x, center, coef_x, coef_c, (fx, fc))
    torch.testing.assert_close(grad.double(), expected, atol=1e-4, rtol=1e-4)
