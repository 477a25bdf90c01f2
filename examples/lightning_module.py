"""PyTorch Lightning with densenet_fast.

NOT RUN: Lightning was not installed where this example was written (2026-12-02), so unlike the
other examples no test runs it. It uses only long-standing Lightning API (LightningModule,
Trainer, ``setup``); please report it if it fails.

    pip install lightning
    python examples/lightning_module.py                      # CPU or one GPU, FakeData
    python examples/lightning_module.py --devices 4          # DDP on 4 GPUs, synchronized BN

Do not pass ``Trainer(sync_batchnorm=True)``: it swaps modules for torch.nn.SyncBatchNorm, which
does not reach the BNs inside densenet_fast's fused blocks. ``setup`` calls
``densenet_fast.convert_sync_batchnorm`` instead, once the process group exists.
"""
import argparse

import lightning as L
import torch
import torchvision
from torch import nn

import densenet_fast


class DenseNetClassifier(L.LightningModule):
    def __init__(self, depth: int = 40, growth_rate: int = 12, num_classes: int = 10, lr: float = 0.05):
        super().__init__()
        self.save_hyperparameters()
        self.model = densenet_fast.densenet_bc(depth, growth_rate, num_classes=num_classes)

    def setup(self, stage: str) -> None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            densenet_fast.convert_sync_batchnorm(self.model)

    def forward(self, x):
        return self.model(x)

    def training_step(self, batch, batch_idx):
        images, targets = batch
        loss = nn.functional.cross_entropy(self(images), targets)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, targets = batch
        self.log("val_accuracy", (self(images).argmax(1) == targets).float().mean(), prog_bar=True, sync_dist=True)

    def configure_optimizers(self):
        optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=0.9, weight_decay=1e-4)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.trainer.max_epochs)
        return [optimizer], [scheduler]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("-b", "--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    tf = torchvision.transforms.ToTensor()
    train = torchvision.datasets.FakeData(512, (3, 32, 32), 10, tf)
    val = torchvision.datasets.FakeData(128, (3, 32, 32), 10, tf, random_offset=512)
    trainer = L.Trainer(max_epochs=args.epochs, devices=args.devices,
                        strategy="ddp" if args.devices > 1 else "auto")
    trainer.fit(DenseNetClassifier(), torch.utils.data.DataLoader(train, batch_size=args.batch_size, shuffle=True),
                torch.utils.data.DataLoader(val, batch_size=args.batch_size))
    # The state_dict of ``model`` is a torchvision DenseNet-BC's (see examples/export.py).
    torch.save(trainer.lightning_module.model.state_dict(), "lightning_densenet.pt")


if __name__ == "__main__":
    main()
