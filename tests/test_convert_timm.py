"""convert() on timm's DenseNets: the same numbers as timm's own model."""
import pytest
import torch

import densenet_fast

timm = pytest.importorskip("timm")  # a declared test dependency (Makefile); guards a bare install


@pytest.mark.parametrize("proj_drop_rate", [0.0, 0.2])
def test_timm_densenet_converts_to_the_same_network(proj_drop_rate):
    torch.manual_seed(0)
    theirs = timm.models.densenet.DenseNet(growth_rate=8, block_config=(2, 3, 2), num_classes=7, bn_size=2,
                                           proj_drop_rate=proj_drop_rate).double()
    theirs.features.denseblock2.denselayer1.norm1.eval()
    fast = densenet_fast.convert(theirs)
    assert fast.features.denseblock1.denselayer1.drop_rate == proj_drop_rate
    assert not fast.features.denseblock2.denselayer1.norm1.training
    x = torch.randn(2, 3, 64, 48, dtype=torch.double, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(3)
    out_theirs = theirs(x)
    torch.manual_seed(3)
    out = fast(x)
    torch.testing.assert_close(out, out_theirs)
    out.sum().backward()
    out_theirs.sum().backward()
    for (name, p), q in zip(fast.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(fast.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(b, c, msg=name)


@pytest.mark.parametrize("kwargs, match", [
    (dict(stem_type="deep"), "conv0"),
    (dict(act_layer="gelu"), "expected ReLU only"),
    (dict(global_pool="max"), "global pooling 'max'"),
    (dict(drop_rate=0.3), "dropout 0.3 before the classifier"),
])
def test_timm_variants_that_compute_something_else_are_refused(kwargs, match):
    theirs = timm.models.densenet.DenseNet(growth_rate=4, block_config=(1, 1), num_classes=3, **kwargs)
    with pytest.raises(TypeError, match=match):
        densenet_fast.convert(theirs)
