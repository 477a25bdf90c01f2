"""bn_coefficients (a BN's scale and shift into a (2, C) block of the packed numbers) on every
backend against densenet_fast.ops.reference, in float64 and float32 statistics: nothing around the
block written."""
import pytest
import torch

from helpers import check_op, op_cases, seeded
from test_bn_relu_conv1x1 import AFFINES, bn_affine_parameters


@pytest.mark.parametrize("affine", AFFINES)
@pytest.mark.parametrize("channels", [1, 37, 300])
@pytest.mark.parametrize("case, shape", op_cases("stats", dtypes=(torch.float64, torch.float32)))
def test_bn_coefficients(case, shape, channels, affine):
    def vector(seed):
        return seeded(channels, seed).to(device=case.device, dtype=case.stats_dtype)

    weight, bias = bn_affine_parameters(channels, case, affine, seed=3)
    packed = seeded(2 * channels + 7, 5).to(device=case.device, dtype=case.stats_dtype)
    check_op(case, "bn_coefficients", vector(1), vector(2).abs() + 0.1, weight, bias,
             packed[3:3 + 2 * channels].view(2, channels))
