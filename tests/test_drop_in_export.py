"""Issue 10, export and tracing in eval mode: torch.jit.script (+ save/load), torch.jit.trace, torch.fx, torchvision's
feature extraction (node names equal torchvision's), torch.export (+ save/load), ONNX (classic and dynamo, where
onnx, onnxscript and onnxruntime are installed). Outputs equal torchvision's with the same weights, float64."""
import importlib.util

import pytest
import torch
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

from drop_in_helpers import CONFIG3, assert_same_tensors, tiny_input, torchvision_twin


def _eval_pair(dtype=torch.float64):
    tv, ours = torchvision_twin(config=CONFIG3, dtype=dtype)
    return tv.eval(), ours.eval()


def _inputs():
    # Two inputs: a trace or an export must not have baked the first one's values in.
    return tiny_input(CONFIG3, batch=2, seed=1), tiny_input(CONFIG3, batch=2, seed=2)


def _assert_runs_like_torchvision(exported, tv, what):
    with torch.no_grad():
        for i, x in enumerate(_inputs()):
            assert_same_tensors([exported(x)], [tv(x)], f"{what}, input {i}")


def test_jit_script_and_save_load(tmp_path):
    tv, ours = _eval_pair()
    scripted = torch.jit.script(ours)
    _assert_runs_like_torchvision(scripted, tv, "jit.script")
    scripted.save(str(tmp_path / "ours.pt"))
    _assert_runs_like_torchvision(torch.jit.load(str(tmp_path / "ours.pt")), tv, "jit.script saved and loaded")


def test_jit_script_in_training_mode_matches():
    """torchvision's test_jit_forward_backward scripts a training-mode model; gradients must match too."""
    tv, ours = torchvision_twin(config=CONFIG3)
    scripted = torch.jit.script(ours)
    x = tiny_input(CONFIG3, batch=2).requires_grad_(True)
    xt = x.detach().clone().requires_grad_(True)
    scripted(x).pow(2).sum().backward()
    tv(xt).pow(2).sum().backward()
    assert_same_tensors([x.grad] + [p.grad for p in ours.parameters()],
                        [xt.grad] + [p.grad for p in tv.parameters()], "scripted training step: input, param grads")


def test_jit_trace():
    tv, ours = _eval_pair()
    traced = torch.jit.trace(ours, _inputs()[0])
    _assert_runs_like_torchvision(traced, tv, "jit.trace")


def test_fx_symbolic_trace():
    tv, ours = _eval_pair()
    _assert_runs_like_torchvision(torch.fx.symbolic_trace(ours), tv, "fx.symbolic_trace")


def test_feature_extraction_node_names_and_outputs():
    tv, ours = _eval_pair()
    names_tv = get_graph_node_names(tv)
    names = get_graph_node_names(ours)
    assert names[0] == names_tv[0], "train-mode node names differ from torchvision's"
    assert names[1] == names_tv[1], "eval-mode node names differ from torchvision's"
    nodes = ["features.denseblock1.denselayer2.conv1", "features.denseblock1", "features.transition1.pool",
             "features.denseblock2.denselayer3.norm2", "features.transition2", "features.norm5", "classifier"]
    nodes += [n for n in names_tv[1] if n.endswith("cat")][:2]  # torchvision's own concatenation nodes
    extract_tv = create_feature_extractor(tv, return_nodes=nodes)
    extract = create_feature_extractor(ours, return_nodes=nodes)
    with torch.no_grad():
        x = _inputs()[0]
        assert_same_tensors(extract(x), extract_tv(x), "extracted features")


def test_torch_export_save_load(tmp_path):
    tv, ours = _eval_pair()
    x = _inputs()[0]
    program = torch.export.export(ours, (x,))
    _assert_runs_like_torchvision(program.module(), tv, "torch.export")
    path = tmp_path / "ours.pt2"
    torch.export.save(program, str(path))
    _assert_runs_like_torchvision(torch.export.load(str(path)).module(), tv, "torch.export saved and loaded")


def _missing(*modules):
    return [m for m in modules if importlib.util.find_spec(m) is None]


@pytest.mark.parametrize("dynamo", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["classic", "dynamo"])
def test_onnx_export(dynamo, tmp_path):
    needed = ["onnx", "onnxruntime"] + (["onnxscript"] if dynamo else [])
    if _missing(*needed):
        pytest.skip(f"ONNX export needs {needed}; not installed: {_missing(*needed)}")
    import onnxruntime

    # float32: what ONNX Runtime's CPU kernels cover for every op of the model.
    tv, ours = _eval_pair(torch.float32)
    x = _inputs()[0].float()
    path = str(tmp_path / "ours.onnx")
    torch.onnx.export(ours, (x,), path, dynamo=dynamo, input_names=["x"], output_names=["logits"])
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    with torch.no_grad():
        (logits,) = session.run(None, {"x": x.numpy()})
        assert_same_tensors([torch.from_numpy(logits)], [tv(x)], f"ONNX ({'dynamo' if dynamo else 'classic'})",
                            dtype=torch.float32)


def test_scripted_feature_extractor_trains_like_torchvision():
    """torchvision's test_jit_forward_backward: an fx feature extractor of a training-mode model, then
    torch.jit.script (the fx code carries forward's annotations: they must be names TorchScript resolves)."""
    tv, ours = torchvision_twin(config=CONFIG3)
    nodes = ["features.denseblock1.denselayer1.conv2", "features.transition1.pool", "features.norm5", "classifier"]
    x = tiny_input(CONFIG3, batch=2)

    def step(model):
        extractor = create_feature_extractor(model, return_nodes=nodes)
        xs = x.clone().requires_grad_(True)
        out = torch.jit.script(extractor)(xs)  # the scripted module shares the extractor's parameters
        sum(v.pow(2).mean() for v in out.values()).backward()
        grads = {name: p.grad for name, p in extractor.named_parameters()}
        return [t.detach() for t in out.values()] + [xs.grad], grads

    (values, grads), (values_tv, grads_tv) = step(ours), step(tv)
    assert_same_tensors(values, values_tv, "scripted extractor: features, input grad")
    assert_same_tensors(grads, grads_tv, "scripted extractor: parameter grads")
