"""Issue 10, autodiff beyond one backward: double backward (gradient penalties), torch.func (vmap, grad, jvp,
jacfwd) and forward-mode AD, each against torchvision with the same weights, in float64."""
import pytest
import torch
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jacfwd, jvp, replace_all_batch_norm_modules_, vmap

from drop_in_helpers import assert_declines, assert_same_tensors, seeded, tiny_input, torchvision_twin

FUNCTORCH_OR_FORWARD_AD = r"torch\.func|functorch|forward.mode|forward AD|dual|jvp|vmap"


def _gradient_penalty(model, x, seed):
    """d/d(params, x) of ||d <out, v> / dx||^2, the WGAN-GP / R1 penalty."""
    x = x.clone().requires_grad_(True)
    out = model(x)
    (gx,) = torch.autograd.grad((out * seeded(out.shape, seed)).sum(), x, create_graph=True)
    penalty = gx.pow(2).sum()
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad(penalty, [x] + params, allow_unused=True)
    return [out.detach(), gx.detach()] + [torch.zeros_like(p) if g is None else g for g, p in zip(grads, [x] + params)]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_double_backward_gradient_penalty(mode):
    tv, ours = torchvision_twin()
    tv.train(mode == "train")
    ours.train(mode == "train")
    x = tiny_input()
    for step in range(2):  # running stats move identically in training
        expected = _gradient_penalty(tv, x, seed=20 + step)
        actual = _gradient_penalty(ours, x, seed=20 + step)
        assert_same_tensors(actual, expected, f"{mode} step {step}: output, input grad, penalty grads (x, params)")
    assert_same_tensors(dict(ours.named_buffers()), dict(tv.named_buffers()), "running stats")


def _tiny():
    tv, ours = torchvision_twin()
    return tv.eval(), ours.eval()


def test_vmap_over_a_batch_of_batches():
    tv, ours = _tiny()
    xs = seeded((2, 2, 3, 16, 12), 3)
    assert_same_tensors([vmap(ours)(xs)], [vmap(tv)(xs)], "vmap output")
    assert_declines(lambda: vmap(ours)(xs), FUNCTORCH_OR_FORWARD_AD)


def _func_pair(mode):
    """Eval mode, or training mode the way torch.func documents it: BatchNorms without running stats
    (torch.func.replace_all_batch_norm_modules_), since a transform cannot update captured buffers in place."""
    tv, ours = torchvision_twin()
    if mode == "train_batch_stats":
        for model in (tv, ours):
            replace_all_batch_norm_modules_(model)
    tv.train(mode != "eval")
    ours.train(mode != "eval")
    return tv, ours


@pytest.mark.parametrize("mode", ["train_batch_stats", "eval"])
def test_func_grad_of_functional_call(mode):
    tv, ours = _func_pair(mode)
    x = tiny_input()

    def loss(model):
        params = {k: v.detach() for k, v in model.named_parameters()}
        return grad(lambda p: functional_call(model, p, (x,)).pow(2).sum())(params)

    assert_same_tensors(loss(ours), loss(tv), f"torch.func.grad ({mode})")
    assert_same_tensors(dict(ours.named_buffers()), dict(tv.named_buffers()), "running stats")
    assert_declines(lambda: loss(ours), FUNCTORCH_OR_FORWARD_AD)


@pytest.mark.parametrize("mode", ["train_batch_stats", "eval"])
def test_func_jvp_tangents(mode):
    """The tangents were zero: the custom op had no forward-mode formula."""
    tv, ours = _func_pair(mode)
    x, v = tiny_input(), seeded(tiny_input().shape, 4)
    out_tv, tangent_tv = jvp(tv, (x,), (v,))
    out, tangent = jvp(ours, (x,), (v,))
    assert tangent_tv.abs().max() > 0
    assert_same_tensors([out, tangent], [out_tv, tangent_tv], f"jvp output, tangent ({mode})")
    assert_declines(lambda: jvp(ours, (x,), (v,)), FUNCTORCH_OR_FORWARD_AD)


def test_jacfwd():
    tv, ours = _tiny()
    x = seeded((1, 3, 8, 8), 5)  # 192 inputs x 5 outputs
    assert_same_tensors([jacfwd(ours)(x)], [jacfwd(tv)(x)], "jacfwd")


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_forward_mode_ad_dual_numbers(mode):
    tv, ours = torchvision_twin()
    tv.train(mode == "train")
    ours.train(mode == "train")
    x, v = tiny_input(), seeded(tiny_input().shape, 6)

    def primal_and_tangent(model):
        with forward_ad.dual_level():
            out = forward_ad.unpack_dual(model(forward_ad.make_dual(x, v)))
            return [out.primal.clone(), out.tangent.clone()]

    assert_same_tensors(primal_and_tangent(ours), primal_and_tangent(tv), f"forward AD primal, tangent ({mode})")
    assert_declines(lambda: primal_and_tangent(ours), FUNCTORCH_OR_FORWARD_AD)


def test_forward_mode_ad_through_parameters():
    """A tangent on a block conv's weight (as torch.func.jvp over parameters gives)."""
    tv, ours = _tiny()
    x = tiny_input()
    name = "features.denseblock1.denselayer2.conv2.weight"

    def tangent(model):
        params = dict(model.named_parameters())
        weight = params[name].detach()
        return jvp(lambda w: functional_call(model, {**params, name: w}, (x,)), (weight,),
                   (seeded(weight.shape, 7),))

    assert_same_tensors(list(tangent(ours)), list(tangent(tv)), "output, tangent w.r.t. a block weight")


@pytest.mark.parametrize("hooks", ["save_on_cpu", "checkpoint"])
def test_double_backward_under_the_users_saved_tensor_hooks(hooks):
    """The stage packs its saved tensors itself only where no other saved-tensor hooks are active;
    under the user's (offloading, checkpointing) the penalty still matches torchvision's."""
    tv, ours = torchvision_twin()
    x = tiny_input()

    def penalty(model):
        if hooks == "checkpoint":
            wrapped = lambda inp: torch.utils.checkpoint.checkpoint(model, inp, use_reentrant=False)  # noqa: E731
            return _gradient_penalty(wrapped_module(wrapped, model), x, seed=20)
        with torch.autograd.graph.save_on_cpu():
            return _gradient_penalty(model, x, seed=20)

    assert_same_tensors(penalty(ours), penalty(tv), f"gradient penalty under {hooks}")


class wrapped_module(torch.nn.Module):
    """A callable with the model's parameters, for _gradient_penalty."""

    def __init__(self, fn, model):
        super().__init__()
        self.fn, self.model = fn, model

    def forward(self, x):
        return self.fn(x)


def test_an_in_place_change_of_a_saved_parameter_is_refused_like_torchvision():
    for model in torchvision_twin():
        out = model(tiny_input().requires_grad_(True)).sum()
        with torch.no_grad():
            model.features.denseblock1.denselayer2.conv1.weight.mul_(2)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()
