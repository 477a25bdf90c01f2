"""Data-parallel training with torchrun: DistributedDataParallel and densenet_fast's synchronized BN.

    torchrun --nproc_per_node=8 examples/ddp_torchrun.py --model densenet121 --img-size 224 -b 32
    torchrun --nproc_per_node=2 examples/ddp_torchrun.py          # CPU: gloo, a small DenseNet-BC

``densenet_fast.convert_sync_batchnorm`` plays the part of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
(which would not reach the BNs inside densenet_fast's fused blocks): every BN computes its batch
statistics over all processes, exchanging them once per new channel. The data is torchvision's
FakeData (no download); put an ImageFolder in its place for real training. At the end every rank
checks that its weights equal rank 0's (DDP keeps the replicas identical), and rank 0 saves them.
"""
import argparse
import os

import torch
import torch.distributed as dist
import torchvision
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

import densenet_fast


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="densenet_bc", choices=["densenet_bc", "densenet121", "densenet169"])
    parser.add_argument("--depth", type=int, default=40, help="densenet_bc's depth (6n+4)")
    parser.add_argument("--growth-rate", type=int, default=12, help="densenet_bc's k")
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("-b", "--batch-size", type=int, default=16, help="per process")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--output", default="ddp_model.pt", help="rank 0 saves the state_dict here")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")  # torchrun sets RANK, WORLD_SIZE, MASTER_ADDR...
    rank, world = dist.get_rank(), dist.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    if args.model == "densenet_bc":
        model = densenet_fast.densenet_bc(args.depth, args.growth_rate, num_classes=10)
    else:
        model = getattr(densenet_fast, args.model)(num_classes=10)
    model = densenet_fast.convert_sync_batchnorm(model).to(device)
    ddp = DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)

    data = torchvision.datasets.FakeData(args.steps * args.batch_size * world, (3, args.img_size, args.img_size),
                                         10, torchvision.transforms.ToTensor())
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=True)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9)
    ddp.train()
    for step, (images, targets) in enumerate(loader):
        loss = nn.functional.cross_entropy(ddp(images.to(device)), targets.to(device))
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients across processes
        optimizer.step()
        if rank == 0:
            print(f"step {step + 1}/{len(loader)}: loss {loss.item():.4f}", flush=True)

    # Every replica holds the same weights and BN running statistics (synchronized BN: same statistics).
    state = model.state_dict()
    for name, value in state.items():
        reference = value.clone()
        dist.broadcast(reference, src=0)
        if not torch.equal(value, reference):
            raise SystemExit(f"rank {rank}: {name} differs from rank 0's")
    if rank == 0:
        torch.save(state, args.output)  # a plain densenet_fast / torchvision state_dict
        print(f"{world} processes agree on every weight and running statistic; saved {args.output}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
