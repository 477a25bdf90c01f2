"""Issue 10, what users do to a model's modules: hooks, replaced modules, reparametrizations, FrozenBatchNorm2d,
SyncBatchNorm. Each case applies the same change to torchvision's DenseNet and ours (same weights) and compares,
in float64: outputs, input grads, every parameter grad, running stats, eval outputs. Where the fused op cannot
compute what the modules say, it must decline: a FallbackError naming the reason after set_fallback('error'),
a warning by default. Where it can, it must keep running fused."""
import functools

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import densenet_fast
from drop_in_helpers import (
    CONFIG,
    assert_declines,
    assert_fused,
    assert_same_tensors,
    library_warnings,
    seeded,
    tiny_input,
    torchvision_twin,
    train_step,
)
from helpers import compare_with_reference, randomize_bn
from test_distributed import _run as run_in_process_group

LAYER = "features.denseblock1.denselayer1"
LAYER2 = "features.denseblock1.denselayer2"



# --- hooks ----------------------------------------------------------------------------------------


def _edit_output(module, args, output):
    return output * 1.5 + 0.1


def _edit_input(module, args):
    return (args[0] * 0.5 - 0.2,)


def _scale_grad_input(module, grad_input, grad_output):
    return tuple(None if g is None else g * 2.0 for g in grad_input)


def _scale_grad_output(module, grad_output):
    return tuple(g * -0.5 for g in grad_output)


HOOKS = {  # where, how it is registered, what it does
    "forward_hook_edits_layer_conv1": (f"{LAYER2}.conv1", "register_forward_hook", _edit_output),
    "forward_pre_hook_edits_transition_norm": ("features.transition1.norm", "register_forward_pre_hook", _edit_input),
    "full_backward_hook_edits_layer_conv2": (f"{LAYER}.conv2", "register_full_backward_hook", _scale_grad_input),
    "backward_pre_hook_edits_transition_conv": ("features.transition1.conv", "register_full_backward_pre_hook",
                                                _scale_grad_output),
    # On a block itself: the block may still run fused (its hooks wrap its call), but they must fire.
    "forward_hook_edits_block_output": ("features.denseblock1", "register_forward_hook", _edit_output),
    "full_backward_hook_edits_block": ("features.denseblock2", "register_full_backward_hook", _scale_grad_input),
}


@pytest.mark.parametrize("case", list(HOOKS))
def test_hook_that_edits_is_applied(case):
    where, register, hook = HOOKS[case]
    tv, ours = torchvision_twin(lambda m: getattr(m.get_submodule(where), register)(hook))
    x = tiny_input()
    compare_with_reference(ours, tv, x)
    if where.count(".") > 1:  # a module inside a stage: the fused op cannot run it
        ours.train()
        assert_declines(lambda: train_step(ours, x), r"hook")


def _recorder(log, kind):
    def forward(module, args, output):
        log.append((kind, output.detach().clone()))

    def backward(module, grad_input, grad_output):
        log.extend((kind, g.detach().clone()) for g in grad_output if g is not None)

    return forward if kind == "forward" else backward


def test_observing_hooks_fire_as_in_torchvision():
    """Forward hooks inside a block, the block's own full backward hook and a layer's: same calls, same tensors."""
    logs = []  # torchvision_twin modifies torchvision's model first, then ours

    def observe(model):
        log = []
        logs.append(log)
        model.get_submodule(f"{LAYER}.relu2").register_forward_hook(_recorder(log, "forward"))
        model.get_submodule("features.transition1.pool").register_forward_hook(_recorder(log, "forward"))
        model.get_submodule("features.denseblock1").register_full_backward_hook(_recorder(log, "backward"))
        model.get_submodule(f"{LAYER2}.conv2").register_full_backward_hook(_recorder(log, "backward"))

    tv, ours = torchvision_twin(observe)
    x = tiny_input()
    train_step(tv, x)
    train_step(ours, x)
    log_tv, log = logs
    assert [k for k, _ in log] == [k for k, _ in log_tv]
    assert_same_tensors([t for _, t in log], [t for _, t in log_tv], "hook tensors")


def test_global_module_hook_sees_the_modules():
    seen = {"torchvision": [], "densenet_fast": []}

    def hook(module, args, output):
        if isinstance(module, nn.Conv2d):
            seen[current[0]].append(output.detach().clone())
        return output * 1.25 if isinstance(module, nn.ReLU) else None

    tv, ours = torchvision_twin()
    x = tiny_input()
    current = ["torchvision"]
    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        out_tv = tv(x)
        current[0] = "densenet_fast"
        out = ours(x)
        assert_same_tensors([out], [out_tv], "output with a global hook")
        assert_same_tensors(seen["densenet_fast"], seen["torchvision"], "conv outputs seen by a global hook")
        assert_declines(lambda: ours(x), r"hook")
    finally:
        handle.remove()


# --- replaced or reconfigured modules ----------------------------------------------------------------


class HalvedConv2d(nn.Conv2d):
    """A Conv2d subclass computing something else: type checks, not isinstance, must decide fusion."""

    def forward(self, x):
        return super().forward(x) * 0.5


def _conv_like(conv: nn.Conv2d, **changes) -> nn.Conv2d:
    args = dict(in_channels=conv.in_channels, out_channels=conv.out_channels, kernel_size=conv.kernel_size,
                stride=conv.stride, padding=conv.padding, bias=False)
    args.update(changes)
    return nn.Conv2d(**args)


def _replace(where: str, make):
    def modify(model):
        torch.manual_seed(5)  # new parameters: the same in both (the state is copied anyway)
        model.set_submodule(where, make(model.get_submodule(where)))
    return modify


REPLACEMENTS = {  # case: (modification, reason regex)
    "relu1_silu": (_replace(f"{LAYER}.relu1", lambda m: nn.SiLU()), r"SiLU"),
    "relu2_leaky": (_replace(f"{LAYER2}.relu2", lambda m: nn.LeakyReLU(0.2)), r"LeakyReLU"),
    "transition_pool_max": (_replace("features.transition1.pool", lambda m: nn.MaxPool2d(2, 2)), r"MaxPool2d"),
    "transition_pool_3x3": (_replace("features.transition1.pool", lambda m: nn.AvgPool2d(3, 2, padding=1)),
                            r"pool"),
    "conv2_bias": (_replace(f"{LAYER2}.conv2", lambda m: _conv_like(m, bias=True)), r"bias"),
    "conv2_dilation": (_replace(f"{LAYER}.conv2", lambda m: _conv_like(m, dilation=2, padding=2)),
                       r"dilation|padding"),
    "conv2_circular": (_replace(f"{LAYER}.conv2", lambda m: _conv_like(m, padding_mode="circular")),
                       r"padding_mode|circular"),
    "conv1_groups": (_replace(f"{LAYER2}.conv1", lambda m: _conv_like(m, in_channels=m.in_channels, groups=4)),
                     r"groups"),
    "transition_conv_bias": (_replace("features.transition1.conv", lambda m: _conv_like(m, bias=True)), r"bias"),
    "conv1_subclass": (_replace(f"{LAYER}.conv1", lambda m: HalvedConv2d(m.in_channels, m.out_channels, 1,
                                                                         bias=False)), r"HalvedConv2d"),
    "norm1_groupnorm": (_replace(f"{LAYER}.norm1", lambda m: nn.GroupNorm(4, m.num_features)), r"GroupNorm"),
    "norm2_frozen": (_replace(f"{LAYER2}.norm2", lambda m: FrozenBatchNorm2d(m.num_features)),
                     r"FrozenBatchNorm2d"),
    "transition_norm_frozen": (_replace("features.transition1.norm", lambda m: FrozenBatchNorm2d(m.num_features)),
                               r"FrozenBatchNorm2d"),
    "relu2_sequential": (_replace(f"{LAYER}.relu2", lambda m: nn.Sequential(nn.ReLU(), nn.Identity())),
                             r"Sequential"),
}


@pytest.mark.parametrize("case", list(REPLACEMENTS))
def test_replaced_module_inside_a_stage_is_what_runs(case):
    modify, reason = REPLACEMENTS[case]
    # FrozenBatchNorm2d starts as the identity: give it the values a pretrained one has.
    tv, ours = torchvision_twin(lambda m: (modify(m), randomize_bn(m, 0, types=(FrozenBatchNorm2d,))))
    x = tiny_input()
    compare_with_reference(ours, tv, x)
    ours.train()
    assert_declines(lambda: train_step(ours, x), reason)


def test_fallback_warns_once_per_reason():
    tv, ours = torchvision_twin(REPLACEMENTS["relu1_silu"][0])
    x = tiny_input()
    with library_warnings() as caught:
        for _ in range(2):
            train_step(ours, x)
        # A second reason, in the other stage.
        ours.get_submodule("features.denseblock2.denselayer1.conv1").register_forward_hook(_edit_output)
        for _ in range(2):
            train_step(ours, x)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and "SiLU" in messages[0] and "hook" in messages[1], messages


def test_reset_fallback_warnings_warns_each_reason_again():
    _, ours = torchvision_twin(REPLACEMENTS["relu1_silu"][0])
    x = tiny_input()
    with library_warnings() as caught:
        train_step(ours, x)
        train_step(ours, x)  # already warned
        densenet_fast.reset_fallback_warnings()
        train_step(ours, x)
    messages = [str(w.message) for w in caught]
    assert len(messages) == 2 and all("SiLU" in m for m in messages), messages


def _silu_everywhere(model):
    for name, _module in list(model.named_modules()):
        if name.endswith("relu1"):
            model.set_submodule(name, nn.SiLU())


def test_fallback_with_memory_efficient_updates_running_stats_once():
    """memory_efficient=True, every block falling back: the modules run checkpointed, with torchvision's numbers
    and its memory_efficient=False running stats. (torchvision's own checkpoint recompute updates norm1's
    running stats a second time per step; densenet_fast updates them once, fused or not, by design.)"""
    tv, ours = torchvision_twin(_silu_everywhere)
    ours = densenet_fast.DenseNet(**{**CONFIG, "memory_efficient": True})
    _silu_everywhere(ours)
    ours.to(torch.float64).load_state_dict(tv.state_dict())
    compare_with_reference(ours, tv, tiny_input())


def _set_bn(model, **settings):
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            for k, v in settings.items():
                setattr(m, k, v)


@pytest.mark.parametrize("settings", [dict(eps=1e-3, momentum=0.3), dict(momentum=None)], ids=["eps_momentum", "cma"])
def test_standard_modules_with_other_bn_settings_stay_fused(settings):
    tv, ours = torchvision_twin(functools.partial(_set_bn, **settings))
    x = tiny_input()
    compare_with_reference(ours, tv, x)
    ours.train()
    assert_fused(lambda: train_step(ours, x), stages=2)


# --- reparametrizations -------------------------------------------------------------------------------


PARAMETRIZATIONS = {
    "spectral_norm": lambda conv: nn.utils.spectral_norm(conv),
    "parametrizations_spectral_norm": lambda conv: nn.utils.parametrizations.spectral_norm(conv),
    "parametrizations_weight_norm": lambda conv: nn.utils.parametrizations.weight_norm(conv),
    "weight_norm_pre_hook": lambda conv: nn.utils.weight_norm(conv),
}


@pytest.mark.parametrize("where", [f"{LAYER}.conv2", "features.transition1.conv"], ids=["layer_conv2", "transition"])
@pytest.mark.parametrize("kind", list(PARAMETRIZATIONS))
@pytest.mark.filterwarnings("ignore:.*weight_norm.*deprecat")
def test_reparametrized_conv_trains(kind, where):
    def modify(model):
        torch.manual_seed(7)  # spectral norm's power-iteration start vector: the same in both
        PARAMETRIZATIONS[kind](model.get_submodule(where))

    tv, ours = torchvision_twin(modify)
    x = tiny_input()
    compare_with_reference(ours, tv, x)  # two training steps: the power iteration advances in both
    ours.train()
    assert_declines(lambda: train_step(ours, x), r"hook|parametri")


# --- SyncBatchNorm --------------------------------------------------------------------------------------


def test_torch_convert_sync_batchnorm_outside_distributed_matches_and_stays_fused():
    """torch.nn.SyncBatchNorm.convert_sync_batchnorm (torchvision's --sync-bn, Lightning's sync_batchnorm=True):
    without a process group torch's SyncBatchNorm is BatchNorm; the blocks stay fused."""
    tv, ours = torchvision_twin()
    tv = nn.SyncBatchNorm.convert_sync_batchnorm(tv)
    ours = nn.SyncBatchNorm.convert_sync_batchnorm(ours)
    assert type(ours.get_submodule(f"{LAYER}.norm1")) is nn.SyncBatchNorm
    x = tiny_input()
    compare_with_reference(ours, tv, x)
    ours.train()
    assert_fused(lambda: train_step(ours, x), stages=2)


SHARDS = (2, 3)  # unequal: statistics must be weighted by counts


def _sync_check(rank):
    """Each process runs block 1 and transition 1 of ours (torch's convert_sync_batchnorm applied) on its shard;
    synchronized BN is BN over the whole batch: torchvision's plain modules on the concatenated batch."""
    tv, ours = torchvision_twin()
    ours = nn.SyncBatchNorm.convert_sync_batchnorm(ours)
    x = seeded((sum(SHARDS), 8, 4, 4), 11)
    stage_tv = nn.Sequential(tv.features.denseblock1, tv.features.transition1).train()
    stage = nn.Sequential(ours.features.denseblock1, ours.features.transition1).train()
    xs = torch.split(x, SHARDS)[rank].clone().requires_grad_(True)
    xt = x.clone().requires_grad_(True)
    g = seeded((sum(SHARDS), 8, 2, 2), 12)
    out, out_tv = stage(xs), stage_tv(xt)
    out.backward(torch.split(g, SHARDS)[rank])
    out_tv.backward(g)
    assert_same_tensors([out, xs.grad], [torch.split(out_tv, SHARDS)[rank], torch.split(xt.grad, SHARDS)[rank]],
                        f"rank {rank} output, input grad")
    grads = [p.grad.clone() for p in stage.parameters()]
    for gr in grads:
        dist.all_reduce(gr)  # parameter grads are local to each process, as with torch.nn.SyncBatchNorm
    assert_same_tensors(grads, [p.grad for p in stage_tv.parameters()], f"rank {rank} summed parameter grads")
    assert_same_tensors(list(stage.buffers()), list(stage_tv.buffers()), f"rank {rank} running stats")


@pytest.mark.slow
def test_torch_sync_batchnorm_synchronizes_blocks_across_processes(tmp_path):
    """~15 s: two gloo processes. torch.nn.SyncBatchNorm itself refuses CPU tensors, so the reference is its
    definition: BN over the concatenated batch."""
    mp.spawn(run_in_process_group, args=(2, str(tmp_path / "init"), _sync_check), nprocs=2, join=True)
