"""Train with densenet_fast, export through torchvision: the same state_dict, a plain torchvision model.

    python examples/export.py                           # a DenseNet-BC, 20 steps on FakeData, torch.export
    python examples/export.py --model densenet121 --img-size 224 --onnx densenet121.onnx

densenet_fast trains in a fraction of the memory; for deployment the trained weights go into
torchvision's own DenseNet (``load_state_dict``: same names and shapes), which exporters and
runtimes already know. The script checks that both models give the same outputs in eval mode,
then saves a ``torch.export`` program (``.pt2``) and, with ``--onnx``, an ONNX file (needs the
``onnx`` and ``onnxscript`` packages: torch.onnx's exporter).
"""
import argparse
import sys

import torch
import torchvision
from torch import nn

import densenet_fast
from densenet_fast.comparison import torchvision_densenet_bc


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="densenet_bc", choices=["densenet_bc", "densenet121", "densenet169"])
    parser.add_argument("--depth", type=int, default=40, help="densenet_bc's depth (6n+4)")
    parser.add_argument("--growth-rate", type=int, default=12, help="densenet_bc's k")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("-b", "--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--output", default="densenet.pt2", help="the torch.export program")
    parser.add_argument("--onnx", metavar="FILE.onnx", help="also export to ONNX")
    args = parser.parse_args(argv)
    if args.onnx:
        try:
            import onnx  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as err:
            sys.exit(f"--onnx needs torch.onnx's exporter dependencies: {err}; pip install onnx onnxscript")

    # 1. Train with densenet_fast (FakeData here; your data loader in practice).
    torch.manual_seed(0)
    if args.model == "densenet_bc":
        model = densenet_fast.densenet_bc(args.depth, args.growth_rate, num_classes=10)
    else:
        model = getattr(densenet_fast, args.model)(num_classes=10)
    data = torchvision.datasets.FakeData(args.steps * args.batch_size, (3, args.img_size, args.img_size), 10,
                                         torchvision.transforms.ToTensor())
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size, drop_last=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    model.train()
    for images, targets in loader:
        loss = nn.functional.cross_entropy(model(images), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"trained {len(loader)} steps, last loss {loss.item():.4f}")

    # 2. The same weights in torchvision's model.
    if args.model == "densenet_bc":
        tv = torchvision_densenet_bc(args.depth, args.growth_rate, num_classes=10)
    else:
        tv = torchvision.models.__dict__[args.model](num_classes=10)
    tv.load_state_dict(model.state_dict())
    model.eval(), tv.eval()
    x = torch.randn(2, 3, args.img_size, args.img_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), tv(x)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-4)
    print(f"torchvision's model gives densenet_fast's outputs (max difference {(ours - theirs).abs().max():.1e})")

    # 3. Export torchvision's model.
    program = torch.export.export(tv, (x,))
    torch.export.save(program, args.output)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(args.output).module()(x), ours, rtol=1e-4, atol=1e-4)
    print(f"saved {args.output} (torch.export); it reloads and gives the same outputs")
    if args.onnx:
        torch.onnx.export(tv, (x,), args.onnx, input_names=["images"], output_names=["logits"], dynamo=True)
        print(f"saved {args.onnx} (ONNX)")


if __name__ == "__main__":
    main()
