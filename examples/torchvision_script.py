"""An ordinary torchvision training script, with densenet_fast swapped in: one line changes.

    python examples/torchvision_script.py --data-dir /data/imagenette   # DIR/train/<class>/*, DIR/val/<class>/*
    python examples/torchvision_script.py                               # torchvision's FakeData (no download)

Everything else (ImageFolder, transforms, DataLoader, SGD, cross-entropy, state_dict save) is the
script as it was. densenet_fast's models take torchvision's constructor arguments and state_dict
keys, so checkpoints and pretrained weights move both ways:

    model.load_state_dict(torchvision.models.densenet121(weights="DEFAULT").state_dict())
"""
import argparse
import time

import torch
import torchvision
from torch import nn
from torchvision import transforms as T

import densenet_fast


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data-dir", help="ImageFolder root with train/ and val/ (default: FakeData)")
    parser.add_argument("--model", default="densenet121", choices=["densenet121", "densenet169", "densenet201"])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--max-steps", type=int, help="stop each epoch after this many steps")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default="model.pt", help="where the state_dict goes")
    args = parser.parse_args(argv)
    torch.manual_seed(0)

    normalize = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = T.Compose([T.RandomResizedCrop(args.img_size), T.RandomHorizontalFlip(), T.ToTensor(), normalize])
    val_tf = T.Compose([T.Resize(int(args.img_size / 0.875)), T.CenterCrop(args.img_size), T.ToTensor(), normalize])
    if args.data_dir:
        train_set = torchvision.datasets.ImageFolder(f"{args.data_dir}/train", train_tf)
        val_set = torchvision.datasets.ImageFolder(f"{args.data_dir}/val", val_tf)
        num_classes = len(train_set.classes)
    else:
        num_classes = 10
        size = (3, args.img_size, args.img_size)
        train_set = torchvision.datasets.FakeData(64, size, num_classes, T.Compose([T.ToTensor(), normalize]))
        val_set = torchvision.datasets.FakeData(16, size, num_classes, T.Compose([T.ToTensor(), normalize]),
                                                random_offset=64)
    train_loader = torch.utils.data.DataLoader(train_set, batch_size=args.batch_size, shuffle=True, drop_last=True)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=args.batch_size)

    # model = torchvision.models.__dict__[args.model](num_classes=num_classes)   # before
    model = getattr(densenet_fast, args.model)(num_classes=num_classes)          # after: the only change
    model = model.to(args.device)

    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    for epoch in range(args.epochs):
        model.train()
        start, seen, total_loss = time.perf_counter(), 0, 0.0
        for step, (images, targets) in enumerate(train_loader):
            if args.max_steps is not None and step >= args.max_steps:
                break
            images, targets = images.to(args.device), targets.to(args.device)
            loss = criterion(model(images), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total_loss += loss.item() * len(targets)
            seen += len(targets)
        scheduler.step()
        model.eval()
        correct = count = 0
        with torch.no_grad():
            for images, targets in val_loader:
                correct += (model(images.to(args.device)).argmax(1).cpu() == targets).sum().item()
                count += len(targets)
        print(f"epoch {epoch + 1}: train loss {total_loss / max(seen, 1):.4f}, val accuracy {correct / count:.4f}, "
              f"{time.perf_counter() - start:.1f} s")
    torch.save(model.state_dict(), args.output)  # loads into torchvision.models.densenet121 as it is
    print(f"saved {args.output}")


if __name__ == "__main__":
    main()
