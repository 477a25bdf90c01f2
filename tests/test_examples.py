"""examples/ run at tiny sizes on CPU: the torchvision script with densenet_fast swapped in, export
through torchvision, DDP under torchrun (2 gloo processes). examples/lightning_module.py is not run
(Lightning is not installed here; the file says so)."""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from densenet_fast.comparison import torchvision_densenet_bc

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_torchvision_script_with_densenet_fast_swapped_in(tmp_path, capsys):
    out = tmp_path / "model.pt"
    load("torchvision_script").main(["--img-size", "32", "-b", "4", "--max-steps", "2", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "epoch 1: train loss" in printed and "val accuracy" in printed
    tv = torchvision.models.densenet121(num_classes=10)
    tv.load_state_dict(torch.load(out, weights_only=True))  # the checkpoint is torchvision's as it is


def test_export_through_torchvision(tmp_path, capsys):
    program = tmp_path / "bc.pt2"
    argv = ["--depth", "10", "--growth-rate", "4", "--img-size", "8", "-b", "4", "--steps", "2",
            "--output", str(program)]
    load("export").main(argv)
    printed = capsys.readouterr().out
    assert "torchvision's model gives densenet_fast's outputs" in printed and "reloads" in printed
    exported = torch.export.load(str(program)).module()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    reference = torchvision_densenet_bc(10, 4)
    reference.load_state_dict(exported.state_dict())
    torch.testing.assert_close(exported(x), reference.eval()(x))


def test_export_to_onnx_or_a_clear_message(tmp_path, capsys):
    onnx_file = tmp_path / "bc.onnx"
    argv = ["--depth", "10", "--growth-rate", "4", "--img-size", "8", "-b", "4", "--steps", "1",
            "--output", str(tmp_path / "bc.pt2"), "--onnx", str(onnx_file)]
    if importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript"):
        load("export").main(argv)
        assert onnx_file.stat().st_size > 0
    else:
        with pytest.raises(SystemExit, match="pip install onnx onnxscript"):
            load("export").main(argv)


@pytest.mark.slow
def test_ddp_with_torchrun(tmp_path):
    out = tmp_path / "ddp.pt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(EXAMPLES / "ddp_torchrun.py"), "--depth", "10", "--growth-rate", "4", "--img-size", "8",
           "-b", "2", "--steps", "2", "--output", str(out)]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2/2: loss" in proc.stdout and "2 processes agree on every weight" in proc.stdout
    model = torchvision_densenet_bc(10, 4)
    model.load_state_dict(torch.load(out, weights_only=True))
    assert int(model.features.norm5.num_batches_tracked) == 2
