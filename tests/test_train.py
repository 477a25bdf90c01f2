"""``densenet-fast train``: checkpoints and --resume (a longer schedule included), ImageFolder and
CIFAR-10 directories built on disk (nothing is downloaded), and train's bad input. Tiny models at
8x8 pixels on CPU."""
from __future__ import annotations

import math
import pickle
import shutil

import numpy as np
import pytest
import torch

from cli_helpers import assert_one_error_line, run
from densenet_fast import cli, data, train as train_module

TINY = ("train", "--depth", "10", "--growth-rate", "4", "-b", "128", "--img-size", "8", "-j", "0")


def weights(path) -> dict:
    return torch.load(path, weights_only=True)["model"]


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A 2-epoch digits run's checkpoint and output (shared: a digits epoch takes seconds). Its run
    takes about 8 s on a CPU machine: every test that uses it is marked slow."""
    path = tmp_path_factory.mktemp("train") / "straight.pt"
    import contextlib
    import io

    out = io.StringIO()  # module scope has no capsys

    with contextlib.redirect_stdout(out):
        status = cli.main([*TINY, "--epochs", "2", "--checkpoint", str(path)])
    assert status == 0
    return path, out.getvalue()


@pytest.mark.slow  # two_epochs
def test_train_prints_epochs_and_writes_a_checkpoint(two_epochs):
    path, out = two_epochs
    assert "epoch 1/2: lr 0.003, loss" in out and "epoch 2/2: lr 0.0015, loss" in out and "peak memory" in out
    assert out.strip().splitlines()[-1].startswith("test accuracy: ")
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 2 and state["epochs"] == 2 and state["classes"] == [str(i) for i in range(10)]
    assert (state["model_name"], state["depth"], state["growth_rate"], state["lr"], state["seed"]) == (
        "densenet_bc", 10, 4, 3e-3, 0)


@pytest.mark.slow  # two_epochs
def test_interrupted_then_resumed_matches_an_uninterrupted_run(capsys, tmp_path, monkeypatch, two_epochs):
    straight, _ = two_epochs
    resumed = tmp_path / "resumed.pt"
    save = train_module._save

    def save_then_interrupt(*args, **kwargs):  # Ctrl-C right after the first checkpoint
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save", save_then_interrupt)
    assert run(capsys, *TINY, "--epochs", "2", "--checkpoint", str(resumed))[0] == 130
    assert torch.load(resumed, weights_only=True)["epoch"] == 1
    monkeypatch.setattr(train_module, "_save", save)

    status, out, _ = run(capsys, "train", "--epochs", "2", "--checkpoint", str(resumed), "--resume", "-j", "0",
                         "--img-size", "8", "-b", "128")
    assert status == 0 and "resumed from" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    # Same seeds, same per-epoch shuffling, the same learning rates: 1 + 1 epochs equal 2 epochs exactly.
    a, b = weights(resumed), weights(straight)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow  # two_epochs
def test_resume_with_more_epochs_follows_the_longer_schedule(capsys, tmp_path, two_epochs):
    """docs/cli.md's example at a smaller scale: --epochs 2, then --epochs 4 --resume."""
    start, _ = two_epochs
    path = tmp_path / "longer.pt"
    shutil.copy(start, path)
    history = tmp_path / "history.json"
    status, out, _ = run(capsys, "train", "--epochs", "4", "--checkpoint", str(path), "--resume", "-j", "0",
                         "--img-size", "8", "-b", "128", "--json", str(history))
    assert status == 0 and "epoch 3/4" in out and "epoch 4/4" in out
    import json

    epochs = json.loads(history.read_text())["epochs"]
    # Epochs 3 and 4 of a 4-epoch cosine: half the base rate, then 15% of it; never 0.
    assert [e["lr"] for e in epochs] == pytest.approx([1.5e-3, 3e-3 * 0.5 * (1 + math.cos(math.pi * 3 / 4))])
    before, after = weights(start), weights(path)
    changed = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert len(changed) == len([k for k in before if before[k].is_floating_point()])  # every weight and statistic
    assert torch.load(path, weights_only=True)["epoch"] == 4


def test_cosine_schedule_is_cosine_annealing_lr():
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=7)
    for epoch in range(7):
        assert train_module.cosine_lr(0.1, epoch, 7) == pytest.approx(optimizer.param_groups[0]["lr"], abs=1e-12)
        optimizer.step()
        scheduler.step()


@pytest.mark.slow  # two_epochs
def test_resume_refusals(capsys, no_training, two_epochs, tmp_path):
    path, _ = two_epochs
    for argv, fragment in (
        (["--epochs", "1"], "already trained 2 epochs; give --epochs 2 or more"),
        (["--depth", "16"], "--depth 16: the checkpoint"),
        (["--model", "densenet121"], "is a densenet_bc"),
    ):
        status, _, err = run(capsys, "train", "--checkpoint", str(path), "--resume", *argv)
        assert status == 2, err
        assert_one_error_line(err, fragment)
    folder = make_image_folder(tmp_path / "images", splits=("train", "val"))
    status, _, err = run(capsys, "train", "--checkpoint", str(path), "--resume", "--data-dir", str(folder))
    assert status == 2
    assert_one_error_line(err, "trained on 10 classes")


# --- Real data on disk ----------------------------------------------------------------------------

CLASSES = ("cat", "dog", "fish")


def make_image_folder(root, splits=("train", "val"), per_class=(6, 2)):
    """A few seeded random PNGs per class, in ImageFolder's layout (DIR/<split>/<class>/*.png)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in zip(splits, per_class):
        for label, name in enumerate(CLASSES):
            folder = root / split / name if split else root / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
                pixels[..., label] = 255 - label * 40  # a class-specific colour
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def test_train_on_an_image_folder(capsys, tmp_path):
    folder = make_image_folder(tmp_path / "images")
    checkpoint = tmp_path / "folder.pt"
    status, out, _ = run(capsys, *TINY, "-b", "4", "--epochs", "1", "--data-dir", str(folder),
                         "--checkpoint", str(checkpoint))
    assert status == 0
    assert "ImageFolder" in out and "18 train / 6 test images, 3 classes" in out
    line = next(line for line in out.splitlines() if line.startswith("epoch 1/1:"))
    loss = float(line.split("loss ")[1].split(",")[0])
    assert 0 < loss < 10 and "train accuracy" in line and "test accuracy" in line
    accuracy = float(out.strip().splitlines()[-1].removeprefix("test accuracy: "))
    assert min(abs(accuracy - k / 6) for k in range(7)) < 1e-4  # k of the 6 test images
    state = torch.load(checkpoint, weights_only=True)
    assert state["classes"] == list(CLASSES) and state["model"]["classifier.weight"].shape[0] == 3


def test_an_image_folder_without_splits_holds_out_a_seeded_fifth():
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        folder = make_image_folder(Path(tmp), splits=(None,), per_class=(10,))
        first, again = data.open_data("auto", str(folder), 8), data.open_data("folder", str(folder), 8)
        assert len(first.train) == 24 and len(first.test) == 6 and first.classes == list(CLASSES)
        assert first.test.indices == again.test.indices
        assert not set(first.train.indices) & set(first.test.indices)
        labels = [first.test.dataset.targets[i] for i in first.test.indices]
        assert sorted(labels) == [0, 0, 1, 1, 2, 2]  # stratified
        x, y = first.train[0]
        assert x.shape == (3, 8, 8) and y in (0, 1, 2)


def test_train_on_cifar10_in_torchvision_layout(capsys, tmp_path, monkeypatch):
    """A 30 + 10 image CIFAR-10 written in torchvision's pickled layout; torchvision's reader opens it
    (its md5 check of the real files is switched off: these are not the real files)."""
    from torchvision.datasets import CIFAR10

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    for name, count in [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 10)]:
        batch = {"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
                 "labels": [int(v) for v in rng.integers(0, 10, count)]}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)
    monkeypatch.setattr(CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda path, md5=None: True)  # batches.meta
    from densenet_fast.ops import get_backend_name

    before = get_backend_name()
    status, out, err = run(capsys, *TINY, "-b", "8", "--epochs", "1", "--data-dir", str(tmp_path / "cifar"),
                           "--backend", "torch", "--amp", "--channels-last")
    assert status == 0, err
    assert "CIFAR-10" in out and "30 train / 10 test images" in out and "epoch 1/1:" in out
    assert "autocast bfloat16, channels_last" in out.splitlines()[0]
    assert get_backend_name() == before  # --backend pins it for the run only


@pytest.fixture
def no_training(monkeypatch):
    def work(*args, **kwargs):
        raise AssertionError("training started before the input was checked")

    monkeypatch.setattr(train_module, "fit", work)


@pytest.mark.parametrize("argv, fragment", [
    (["--depth", "11"], "6n + 4"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["-b", "0"], "--batch-size must be at least 1"),
    (["--img-size", "3"], "too small for densenet_bc"),
    (["--model", "densenet121", "--img-size", "16"], "at least 29"),
    (["--model", "densenet121", "--depth", "40"], "describe --model densenet_bc"),
    (["--resume"], "--resume needs --checkpoint"),
    (["--resume", "--checkpoint", "/nonexistent.pt"], "no checkpoint at /nonexistent.pt"),
    (["--data-dir", "/nonexistent-data"], "no such directory"),
    (["--dataset", "cifar10"], "needs --data-dir"),
    (["--dataset", "cifar10", "--data-dir", "/tmp"], "no CIFAR-10 in torchvision's layout"),
    (["--json", "/nonexistent-folder/h.json"], "does not exist"),
    (["--checkpoint", "/sys/ckpt.pt"], "not writable"),
    (["--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["--amp-dtype", "fp8"], "invalid choice"),
])
def test_bad_input_is_one_line_and_status_2(capsys, no_training, argv, fragment):
    status, _, err = run(capsys, "train", *argv)
    assert status == 2
    assert_one_error_line(err, "densenet-fast", fragment)


def test_empty_image_folder_is_one_line(capsys, no_training, tmp_path):
    (tmp_path / "train" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat").mkdir(parents=True)
    status, _, err = run(capsys, "train", "--data-dir", str(tmp_path))
    assert status == 2
    assert_one_error_line(err, "--data-dir", "Found no valid file")


def test_digits_without_scikit_learn_names_the_extra(capsys, no_training, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sklearn", None)
    status, _, err = run(capsys, "train")
    assert status == 2
    assert_one_error_line(err, "needs scikit-learn", "pip install 'densenet-fast[cli]'")


def test_digits_split_is_fixed():
    x_train, y_train, x_test, y_test = data.load_digits_tensors()
    assert x_train.shape == (1347, 3, 32, 32) and x_test.shape == (450, 3, 32, 32)
    again = data.load_digits_tensors()
    assert torch.equal(again[3], y_test) and torch.equal(again[0], x_train)


def test_epoch_batches_cover_the_set_and_never_hold_one_image():
    for n, size in ((10, 3), (9, 4), (8, 8), (5, 2)):
        batches = train_module.epoch_batches(n, size, seed=1, epoch=2)
        assert sorted(i for b in batches for i in b) == list(range(n))
        assert all(len(b) >= 2 for b in batches)
        assert batches == train_module.epoch_batches(n, size, seed=1, epoch=2)
    assert train_module.epoch_batches(10, 3, 1, 2) != train_module.epoch_batches(10, 3, 1, 3)
