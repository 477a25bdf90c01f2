"""Smoke test of an installed (non-editable) densenet_fast, run from outside the source tree by .ci/run.

    smoke_installed.py --backends torch,cpp,composite [--against torchvision|reference] [--mismatch TEXT ...]

Checks that the package imported is the installed one, that available_backends() is exactly
--backends, and that one float64 training step (output, input gradient, every parameter gradient,
running statistics) of a small DenseNet matches torchvision's (or densenet_fast.reference's, where
torchvision is not installed) on every available backend. --mismatch (repeatable): the compiled
extension must have been refused with one one-line warning containing each TEXT, and the registry
reasons of both backends on it (cpp, composite) too.
"""
import argparse
import copy
import os
import sys
import warnings

import torch

parser = argparse.ArgumentParser()
parser.add_argument("--backends", required=True, help="comma-separated, in the registry's order")
parser.add_argument("--against", choices=["torchvision", "reference"], default="torchvision")
parser.add_argument("--mismatch", action="append", default=[], help="text the refusal warning must contain")
args = parser.parse_args()

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import densenet_fast
    from densenet_fast.ops import registry as ops

    backends = densenet_fast.available_backends()

here = os.path.dirname(densenet_fast.__file__)
assert here.startswith(sys.prefix) and "site-packages" in here, f"not the installed package: {here}"
print(f"densenet_fast {densenet_fast.__version__} from {here}; torch {torch.__version__}; backends {backends}")
assert backends == args.backends.split(","), f"available_backends() {backends}, expected {args.backends}"

refusals = [w for w in caught if w.category.__name__ == "ExtensionMismatchWarning"]
if args.mismatch:
    assert len(refusals) == 1, f"expected one refusal warning, got {[str(w.message) for w in caught]}"
    w = refusals[0]
    shown = warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line)
    for text in args.mismatch:
        assert text in shown, shown
        for name in ("cpp", "composite"):
            reason = ops._unavailable.get(name, "")
            assert text in reason, f"{name} registry reason: {reason!r}"
    assert shown.count("\n") == 1, f"not one line: {shown!r}"
    message = str(w.message)
    print(f"refused as expected: {message}")
else:
    assert not refusals, [str(w.message) for w in refusals]

config = dict(growth_rate=6, block_config=(2, 3), num_init_features=8, bn_size=2, num_classes=5)
if args.against == "torchvision":
    import torchvision

    expected_model = torchvision.models.DenseNet(**config)
else:
    expected_model = densenet_fast.reference.DenseNet(**config)
gen = torch.Generator().manual_seed(0)
with torch.no_grad():  # random BN affine parameters and running statistics, not the 1/0 defaults
    for module in expected_model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.weight.uniform_(0.5, 1.5, generator=gen)
            module.bias.uniform_(-0.5, 0.5, generator=gen)
            module.running_mean.uniform_(-0.5, 0.5, generator=gen)
            module.running_var.uniform_(0.5, 1.5, generator=gen)
expected_model = expected_model.double()
initial = copy.deepcopy(expected_model.state_dict())
x = torch.randn(3, 3, 29, 29, generator=gen, dtype=torch.float64)
grad = torch.randn(3, 5, generator=gen, dtype=torch.float64)


def step(model):
    inp = x.clone().requires_grad_()
    out = model(inp)
    out.backward(grad)
    return out, inp.grad


def close(actual, expected, what):
    torch.testing.assert_close(actual, expected, atol=1e-9, rtol=1e-7, msg=lambda m: f"{what}: {m}")


want_out, want_grad = step(expected_model)
want_state = expected_model.state_dict()
for name in backends:
    ops.set_backend(name)
    model = densenet_fast.DenseNet(**config).double()
    model.load_state_dict(initial)
    out, inp_grad = step(model)
    close(out, want_out, f"{name}: output")
    close(inp_grad, want_grad, f"{name}: input gradient")
    for (key, p), q in zip(model.named_parameters(), expected_model.parameters(), strict=True):
        close(p.grad, q.grad, f"{name}: gradient of {key}")
    for key, value in model.state_dict().items():  # running statistics after the step
        close(value, want_state[key], f"{name}: {key} after the step")
    print(f"backend {name}: one float64 training step matches {args.against}")
ops.set_backend(None)
print("smoke test passed")
