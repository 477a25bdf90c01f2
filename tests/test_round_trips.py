"""state_dict, torch.save/load, deepcopy, pickle and dtype/device moves keep a working model."""
import copy
import io
import pickle

import pytest
import torch

import densenet_fast


def _model():
    torch.manual_seed(0)
    model = densenet_fast.DenseNet(4, (2, 2), 8, num_classes=3, small_inputs=True, drop_rate=0.1)
    model(torch.randn(2, 3, 8, 8))  # move running stats off their initial values
    return model.eval()


def _x(dtype=torch.float32):
    return torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)).to(dtype)


@pytest.mark.parametrize("how", ["state_dict", "save_load", "deepcopy", "pickle"])
def test_round_trip_gives_the_same_model(how):
    model = _model()
    if how == "state_dict":
        other = densenet_fast.DenseNet(4, (2, 2), 8, num_classes=3, small_inputs=True, drop_rate=0.1).eval()
        other.load_state_dict(model.state_dict())
    elif how == "save_load":
        buf = io.BytesIO()
        torch.save(model, buf)
        buf.seek(0)
        other = torch.load(buf, weights_only=False)
    elif how == "deepcopy":
        other = copy.deepcopy(model)
    else:
        other = pickle.loads(pickle.dumps(model))
    with torch.no_grad():
        torch.testing.assert_close(other(_x()), model(_x()), rtol=0, atol=0)
    # And it still trains.
    other.train()
    other(_x()).sum().backward()
    assert all(p.grad is not None for p in other.parameters())


@pytest.mark.parametrize("convert, dtype", [(lambda m: m.double(), torch.float64), (lambda m: m.half(), torch.float16),
                                            (lambda m: m.to("cpu", torch.bfloat16), torch.bfloat16)])
def test_dtype_moves(convert, dtype):
    model = _model()
    with torch.no_grad():
        expected = model.double()(_x(torch.float64))
        out = convert(model)(_x(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), expected, atol=0.05, rtol=0.05)
