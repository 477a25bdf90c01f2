"""The ``densenet-fast`` command: bench, train, max-depth and their errors, on tiny shapes (CPU, seconds)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import densenet_fast
from densenet_fast import bench, cli


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_error_line(err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# --- bench ----------------------------------------------------------------------------------------

def test_bench_writes_table_json_csv_and_plot(capsys, tmp_path):
    files = {ext: tmp_path / f"out.{ext}" for ext in ("json", "csv", "png")}
    status, out, _ = run(capsys, "bench", "--depth", "10", "--growth-rate", "4", "--batch", "2", "--size", "8",
                         "--rounds", "1", "--json", str(files["json"]), "--csv", str(files["csv"]),
                         "--plot", str(files["png"]), "--plot-depths", "10", "16", "--plot-batches", "2",
                         "--plot-batch", "2", "--plot-size", "8")
    assert status == 0
    expected = ["torchvision", "torchvision memory_efficient"] + [
        f"densenet_fast[{b}]" for b in densenet_fast.available_backends()]
    for name in expected:
        assert f"| {name} |" in out
    payload = json.loads(files["json"].read_text())
    assert [r["model"] for r in payload["results"]] == expected
    assert all(r["peak_bytes"] > 0 and r["step_time_s"] > 0 for r in payload["results"])
    assert {p["depth"] for p in payload["sweeps"]["depth"]} == {10, 16}
    assert {p["batch"] for p in payload["sweeps"]["batch"]} == {2}
    csv_lines = files["csv"].read_text().splitlines()
    assert csv_lines[0].startswith("model,peak_bytes") and len(csv_lines) == 1 + len(expected)
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_under_autocast_and_float64(capsys):
    for extra in (["--amp", "bf16"], ["--dtype", "float64"]):
        status, out, _ = run(capsys, "bench", "--depth", "10", "--growth-rate", "4", "--batch", "2", "--size", "8",
                             "--rounds", "1", *extra)
        assert status == 0 and ("autocast bf16" in out or "float64" in out)


# --- train ----------------------------------------------------------------------------------------

TINY_TRAIN = ("train", "--depth", "10", "--growth-rate", "4", "--batch-size", "128")


def test_train_interrupted_then_resumed_matches_an_uninterrupted_run(capsys, tmp_path, monkeypatch):
    from densenet_fast import train as train_module

    straight, resumed = tmp_path / "straight.pt", tmp_path / "resumed.pt"
    status, out, _ = run(capsys, *TINY_TRAIN, "--epochs", "2", "--checkpoint", str(straight))
    assert status == 0
    assert "epoch 2/2: loss" in out and "peak memory" in out
    assert out.strip().splitlines()[-1].startswith("test accuracy: ")

    save = train_module._save

    def save_then_interrupt(*args, **kwargs):  # Ctrl-C right after the first checkpoint
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "_save", save_then_interrupt)
    assert run(capsys, *TINY_TRAIN, "--epochs", "2", "--checkpoint", str(resumed))[0] == 130
    state = torch.load(resumed, weights_only=True)
    assert state["epoch"] == 1 and {"model", "optimizer", "scheduler"} <= set(state)
    monkeypatch.setattr(train_module, "_save", save)

    status, out, _ = run(capsys, *TINY_TRAIN, "--epochs", "2", "--checkpoint", str(resumed), "--resume")
    assert status == 0 and "resumed from" in out and "epoch 2/2" in out and "epoch 1/2" not in out
    # Same seeds, same per-epoch shuffling: 1 + 1 epochs equal 2 epochs exactly.
    a, b = torch.load(resumed, weights_only=True)["model"], torch.load(straight, weights_only=True)["model"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_digits_split_is_fixed():
    from densenet_fast.train import load_digits_tensors

    x_train, y_train, x_test, y_test = load_digits_tensors()
    assert x_train.shape == (1347, 3, 32, 32) and x_test.shape == (450, 3, 32, 32)
    again = load_digits_tensors()
    assert torch.equal(again[3], y_test) and torch.equal(again[0], x_train)


# --- max-depth ------------------------------------------------------------------------------------

def test_max_depth_on_a_tiny_budget(capsys, tmp_path):
    out_json = tmp_path / "depth.json"
    status, out, _ = run(capsys, "max-depth", "--budget", "4MiB", "--growth-rate", "4", "--batch", "4",
                         "--size", "8", "--fit-depths", "10", "16", "22", "--verify-max-depth", "46",
                         "--json", str(out_json))
    assert status == 0
    assert "estimate" in out and "SGD momentum" in out
    results = {r["kind"]: r for r in json.loads(out_json.read_text())["results"]}
    ours = [r for kind, r in results.items() if kind.startswith("densenet_fast")]
    tv = results["torchvision"]
    assert ours and all(r["depth"] >= tv["depth"] > 0 for r in ours)
    for r in results.values():
        assert r["total_bytes"] <= 4 * 2 ** 20 < r["next_depth_bytes"]
        assert (r["depth"] - 4) % 6 == 0 and r["verified_depth"] > 0


def test_parameter_count_matches_the_model():
    for depth, k in ((10, 4), (40, 12), (100, 24)):
        with torch.device("meta"):
            model = densenet_fast.densenet_bc(depth, k)
        params, buffer_bytes = bench.bc_counts(depth, k)
        assert params == sum(p.numel() for p in model.parameters())
        assert buffer_bytes == sum(b.numel() * b.element_size() for b in model.buffers())


def test_depth_search_on_a_known_curve():
    total = lambda d: 1000 + 3 * d * d  # noqa: E731
    n = bench._largest_fitting_n(total, 1_000_000)
    assert total(6 * n + 4) <= 1_000_000 < total(6 * n + 10)
    assert bench._largest_fitting_n(total, 10) == 0


def test_parse_size():
    assert cli.parse_size("12GiB") == 12 * 2 ** 30
    assert cli.parse_size("16GB") == 16 * 10 ** 9
    assert cli.parse_size("1.5G") == int(1.5 * 2 ** 30)
    assert cli.parse_size("500 MiB") == 500 * 2 ** 20


# --- errors: one line on stderr, exit status 2 ------------------------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["bench", "densenet999"], "invalid choice"),
    (["bench", "densenet121", "--depth", "40"], "not both"),
    (["train", "--depth", "11"], "6n + 4"),
    (["max-depth", "--budget", "12 parsecs"], "not a memory size"),
    (["max-depth", "--budget", "1KiB", "--batch", "2", "--size", "8", "--growth-rate", "4",
      "--fit-depths", "10", "16", "22"], "too small"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_status_2(capsys, argv, fragment):
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert_one_error_line(err, "densenet-fast", fragment)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys):
    for argv in (["train", "--device", "cuda"], ["bench", "--device", "cuda"], ["max-depth", "--device", "cuda"]):
        status, _, err = run(capsys, *argv)
        assert status == 2
        assert_one_error_line(err, "CUDA is not available")


def test_module_entry_point_exit_status():
    """``python -m densenet_fast`` exits with the CLI's status (2 on bad input, no traceback)."""
    proc = subprocess.run([sys.executable, "-m", "densenet_fast", "bench", "--budget"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert_one_error_line(proc.stderr, "unrecognized arguments")


def test_no_command_runs_the_main_job(monkeypatch):
    calls = []
    monkeypatch.setattr("densenet_fast.demo.main", lambda: calls.append("demo"))
    assert cli.main([]) == 0 and calls == ["demo"]
