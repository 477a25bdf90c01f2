"""The data ``densenet-fast train`` trains on: scikit-learn's digits (the default, no download), an
ImageFolder directory, or CIFAR-10 in torchvision's on-disk layout. Nothing is ever downloaded.

- digits: 1,797 grayscale 8x8 images shipped with scikit-learn, upsampled to the image size and
  repeated over 3 channels, standardized with the train split's moments; a fixed stratified 75/25
  split (seed 0).
- folder: ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (``validation`` or ``test`` also name
  the held-out split), as torchvision.datasets.ImageFolder reads them; or ``DIR/<class>/*`` alone,
  of which a seeded 20% of each class is held out. Train: RandomResizedCrop and flips; test: resize
  and center crop (timm's crop fraction 0.875); ImageNet's mean and std.
- cifar10: ``DIR/cifar-10-batches-py`` (or that folder itself), what torchvision.datasets.CIFAR10
  writes; its 50,000 / 10,000 split. Train: 4-pixel padded random crops and flips.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, Subset, TensorDataset

DATASETS = ("auto", "digits", "folder", "cifar10")
SPLIT_SEED = 0
HELD_OUT_SPLITS = ("val", "validation", "test")
CIFAR_FOLDER = "cifar-10-batches-py"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@dataclass
class Data:
    name: str  # "digits", "folder" or "cifar10"
    description: str  # for the log: where it came from and how big it is
    train: Dataset
    test: Dataset
    classes: list[str]


def load_digits_tensors(image_size: int = 32) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): 3 x size x size float images, standardized with the train set's moments."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    train_idx, test_idx = train_test_split(
        torch.arange(len(labels)).numpy(), test_size=0.25, random_state=SPLIT_SEED, stratify=labels.numpy())
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = ((images - mean) / std).expand(-1, 3, -1, -1).contiguous()
    return images[train_idx], labels[train_idx], images[test_idx], labels[test_idx]


def resolve_dataset(dataset: str, data_dir: Optional[str]) -> str:
    """'auto': digits without a directory, cifar10 when it holds torchvision's CIFAR-10 files, else folder."""
    if dataset not in DATASETS:
        raise ValueError(f"--dataset must be one of {', '.join(DATASETS)}, got {dataset!r}")
    if dataset == "digits" and data_dir:
        raise ValueError("--dataset digits ships with scikit-learn; drop --data-dir")
    if dataset in ("folder", "cifar10") and not data_dir:
        raise ValueError(f"--dataset {dataset} needs --data-dir DIR")
    if dataset != "auto":
        return dataset
    if not data_dir:
        return "digits"
    root = Path(data_dir)
    return "cifar10" if root.name == CIFAR_FOLDER or (root / CIFAR_FOLDER).is_dir() else "folder"


def open_data(dataset: str, data_dir: Optional[str], image_size: int) -> Data:
    """The train and test sets; ValueError (one line) when the directory is not what ``dataset`` reads."""
    name = resolve_dataset(dataset, data_dir)
    if name == "digits":
        x_train, y_train, x_test, y_test = load_digits_tensors(image_size)
        return Data(name, f"scikit-learn digits: {len(y_train)} train / {len(y_test)} test images",
                    TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), [str(i) for i in range(10)])
    root = Path(data_dir)
    if not root.is_dir():
        raise ValueError(f"--data-dir {data_dir}: no such directory")
    return _cifar10(root, image_size) if name == "cifar10" else _image_folder(root, image_size)


def _transforms(image_size: int, mean, std, cifar: bool):
    from torchvision import transforms as T

    normalize = [T.ToTensor(), T.Normalize(mean, std)]
    if cifar:
        resize = [] if image_size == 32 else [T.Resize(image_size)]
        train = T.Compose(resize + [T.RandomCrop(image_size, padding=image_size // 8), T.RandomHorizontalFlip()]
                          + normalize)
        return train, T.Compose(resize + normalize)
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()] + normalize)
    test = T.Compose([T.Resize(int(image_size / 0.875)), T.CenterCrop(image_size)] + normalize)
    return train, test


def _image_folder(root: Path, image_size: int) -> Data:
    from torchvision.datasets import ImageFolder

    train_tf, test_tf = _transforms(image_size, IMAGENET_MEAN, IMAGENET_STD, cifar=False)
    held_out = next((root / s for s in HELD_OUT_SPLITS if (root / s).is_dir()), None)
    try:
        if (root / "train").is_dir():
            if held_out is None:
                raise ValueError(f"--data-dir {root}: has train/ but no held-out split "
                                 f"({', '.join(s + '/' for s in HELD_OUT_SPLITS)})")
            train, test = ImageFolder(str(root / "train"), train_tf), ImageFolder(str(held_out), test_tf)
            if train.classes != test.classes:
                raise ValueError(f"--data-dir {root}: train/ and {held_out.name}/ have different class folders")
            where = f"ImageFolder {root}: train/ and {held_out.name}/"
        else:
            full, full_test = ImageFolder(str(root), train_tf), ImageFolder(str(root), test_tf)
            train_idx, test_idx = _held_out_split(full.targets, 0.2)
            train, test = Subset(full, train_idx), Subset(full_test, test_idx)
            train.classes = test.classes = full.classes
            where = f"ImageFolder {root} (a seeded 20% of each class held out)"
    except FileNotFoundError as err:  # no class folders, or a class folder without images
        raise ValueError(f"--data-dir {root}: {str(err).splitlines()[0]}") from None
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"--data-dir {root}: {where} leaves no training or no test images")
    return Data("folder", f"{where}: {len(train)} train / {len(test)} test images, {len(train.classes)} classes",
                train, test, list(train.classes))


def _held_out_split(targets: list[int], fraction: float) -> tuple[list[int], list[int]]:
    """A seeded ``fraction`` of each class's indices (at least one, if the class has two) held out."""
    generator = torch.Generator().manual_seed(SPLIT_SEED)
    train, test = [], []
    for label in sorted(set(targets)):
        indices = [i for i, t in enumerate(targets) if t == label]
        order = [indices[j] for j in torch.randperm(len(indices), generator=generator).tolist()]
        n_test = max(1, round(fraction * len(order))) if len(order) > 1 else 0
        test += order[:n_test]
        train += order[n_test:]
    return sorted(train), sorted(test)


def _cifar10(root: Path, image_size: int) -> Data:
    from torchvision.datasets import CIFAR10

    if root.name == CIFAR_FOLDER:
        root = root.parent
    train_tf, test_tf = _transforms(image_size, CIFAR_MEAN, CIFAR_STD, cifar=True)
    try:
        train = CIFAR10(str(root), train=True, transform=train_tf, download=False)
        test = CIFAR10(str(root), train=False, transform=test_tf, download=False)
    except RuntimeError as err:  # torchvision: "Dataset not found or corrupted."
        raise ValueError(f"--data-dir {root}: no CIFAR-10 in torchvision's layout ({root / CIFAR_FOLDER}: "
                         f"{str(err).splitlines()[0]})") from None
    return Data("cifar10", f"CIFAR-10 {root / CIFAR_FOLDER}: {len(train)} train / {len(test)} test images",
                train, test, list(train.classes))
