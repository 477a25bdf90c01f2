"""The ``densenet-fast`` command: bench, max-depth, flags, help and errors, on tiny shapes (CPU, seconds).
``train`` is in test_train.py."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import densenet_fast
from cli_helpers import assert_one_error_line, run
from densenet_fast import bench, bench_command, cli, comparison, max_depth, tools
from densenet_fast.ops.registry import _FACTORIES


@pytest.fixture
def no_work(monkeypatch):
    """Any model built for a benchmark, step measured for max-depth or epoch trained fails the test."""
    def work(*args, **kwargs):
        raise AssertionError("work started before the input was checked")

    monkeypatch.setattr(bench_command, "comparison_models", work)
    monkeypatch.setattr(max_depth, "measure_step_transient", work)
    monkeypatch.setattr("densenet_fast.train.fit", work)


FLOAT64_BACKEND = "cpp" if "cpp" in densenet_fast.available_backends() else "torch"
TINY_BENCH = ("bench", "--depth", "10", "--growth-rate", "4", "-b", "2", "--img-size", "8", "--rounds", "2",
              "--max-time", "0")


# --- bench ----------------------------------------------------------------------------------------

# The Triton interpreter takes about a minute a step on the loaded CI machine: bench tests name the backends.
FAST_BACKENDS = [b for b in ("torch", "cpp") if b in densenet_fast.available_backends()]


@pytest.mark.slow
def test_bench_writes_table_json_csv_and_plot(capsys, tmp_path):
    files = {ext: tmp_path / f"out.{ext}" for ext in ("json", "csv", "png")}
    backends = [arg for b in FAST_BACKENDS for arg in ("--backend", b)]
    status, out, _ = run(capsys, *TINY_BENCH, *backends, "--json", str(files["json"]), "--csv", str(files["csv"]),
                         "--plot", str(files["png"]), "--plot-depths", "10", "16", "--plot-batches", "2",
                         "--plot-batch", "2", "--plot-size", "8")
    assert status == 0
    expected = ["torchvision", "torchvision memory_efficient"] + [f"densenet_fast[{b}]" for b in FAST_BACKENDS]
    for name in expected:
        assert f"| {name} |" in out
    assert "| step time (median) | IQR | images/s |" in out
    payload = json.loads(files["json"].read_text())
    assert [r["model"] for r in payload["results"]] == expected
    for r in payload["results"]:
        assert r["peak_bytes"] > 0 and len(r["step_times_s"]) == 2 and r["step_time_s"] > 0 and r["iqr_s"] >= 0
        assert r["images_per_s"] == pytest.approx(2 / r["step_time_s"], rel=0.02)
    assert payload["config"]["rounds"] == 2 and payload["config"]["warmup"] == 1
    assert {p["depth"] for p in payload["sweeps"]["depth"]} == {10, 16}
    assert {p["batch"] for p in payload["sweeps"]["batch"]} == {2}
    csv_lines = files["csv"].read_text().splitlines()
    assert csv_lines[0].startswith("model,peak_bytes") and "images_per_s" in csv_lines[0]
    assert len(csv_lines) == 1 + len(expected)
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_compares_every_backend_serving_the_device_by_default():
    serving = densenet_fast.ops.serving_backends("cpu")
    assert tools.check_backends(None, torch.device("cpu"), torch.float32) == serving
    # composite runs on CPU only pinned (for the tests): no benchmark row of its own there.
    assert "torch" in serving and "composite" not in serving
    assert tools.check_backends(["torch"], torch.device("cpu"), torch.float32) == ["torch"]


@pytest.mark.parametrize("extra, shown", [
    (["--amp", "--backend", "torch"], "autocast bfloat16"),
    pytest.param(["--dtype", "float64", "--backend", FLOAT64_BACKEND], "float64", marks=pytest.mark.slow),
    pytest.param(["--channels-last", "--backend", "torch"], "channels_last", marks=pytest.mark.slow)])
def test_bench_precision_and_layout(capsys, extra, shown):
    status, out, _ = run(capsys, *TINY_BENCH, *extra)
    assert status == 0 and shown in out.splitlines()[0]


class _Bar:
    """tqdm's update/total/refresh, recorded."""

    def __init__(self, total: int):
        self.total, self.n = total, 0

    def update(self, n: int = 1):
        self.n += n

    def refresh(self):
        pass


class _Scripted(nn.Module):
    """A conv whose steps take scripted times on a virtual clock: ``durations`` for its timed steps
    (after warm-up, peak memory and ``warmup`` rounds), ``steady`` after them."""

    def __init__(self, clock: list, durations: list, steady: float, warmup: int = 1):
        super().__init__()
        self.conv, self.clock, self.calls = nn.Conv2d(3, 4, 3), clock, 0
        self.durations, self.steady, self.untimed = durations, steady, 2 + warmup

    def forward(self, x):
        self.calls += 1
        timed = self.calls - self.untimed - 1
        self.clock[0] += self.durations[timed] if 0 <= timed < len(self.durations) else self.steady
        return self.conv(x)


def test_timing_rounds_warmup_and_bar():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    clock = [0.0]
    timer = lambda: clock[0]  # noqa: E731
    models = {"torchvision": _Scripted(clock, [1.0, 3.0], 2.0), "other": _Scripted(clock, [], 0.5)}
    bar = _Bar(bench.planned_steps(2, rounds=3, warmup=1))
    results = bench.compare_steps(models, x, rounds=3, warmup=1, bar=bar, timer=timer)
    assert [r.step_times for r in results] == [[1.0, 3.0, 2.0], [0.5, 0.5, 0.5]]
    assert bar.n == bar.total == 2 * (2 + 1 + 3)
    assert all(m.calls == 6 for m in models.values())  # warm-up, peak memory, warm-up round, 3 timed
    assert results[0].step_time == 2.0 and results[0].iqr == 1.0 and results[0].throughput == 1.0
    assert not results[0].stable and not results[1].stable  # fewer than 4 runs

    # Noisy at first: rounds are added until the IQR is under 10% of the median. Timed steps
    # 1,3,1,3,1,3 then 2s: with 6 + 6 the quartiles are 1.75 and 2.25; with 6 + 7 both are 2.
    clock[0] = 0.0
    models = {"torchvision": _Scripted(clock, [1.0, 3.0] * 3, 2.0), "other": _Scripted(clock, [], 0.5)}
    bar = _Bar(bench.planned_steps(2, rounds=4, warmup=1))
    results = bench.compare_steps(models, x, rounds=4, warmup=1, max_time=1000, bar=bar, timer=timer)
    assert [len(r.step_times) for r in results] == [13, 13] and all(r.stable for r in results)
    assert results[0].step_time == 2.0 and results[0].iqr == 0.0
    assert bar.n == bar.total == 2 * (2 + 1 + 13)

    # Always noisy: rounds stop once --max-time seconds of timed steps are spent (4 + 8 rounds of 2.5 s).
    models = {"torchvision": _Scripted(clock, [1.0, 3.0] * 100, 2.0), "other": _Scripted(clock, [], 0.5)}
    results = bench.compare_steps(models, x, rounds=4, warmup=1, max_time=30, timer=timer)
    assert len(results[0].step_times) == 12 and not results[0].stable


def test_min_image_size_is_what_the_models_need():
    import torchvision

    min_size = torchvision.models.DenseNet121_Weights.DEFAULT.meta["min_size"][0]
    assert comparison.min_image_size("densenet121") == min_size
    for name, depth in (("densenet121", None), (None, 10)):
        with torch.device("meta"):
            model = comparison.torchvision_model(name, depth).train()
        for batch in (1, 2):
            side = comparison.min_image_size(name, batch)
            model(torch.empty(batch, 3, side, side, device="meta"))
            with pytest.raises((RuntimeError, ValueError)):  # a 0-pixel map; one value per channel for BN
                model(torch.empty(batch, 3, side - 1, side - 1, device="meta"))


# --- max-depth ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_max_depth_on_a_tiny_budget(capsys, tmp_path):
    out_json = tmp_path / "depth.json"
    backends = [arg for b in FAST_BACKENDS for arg in ("--backend", b)]
    status, out, _ = run(capsys, "max-depth", "--budget", "4MiB", "--growth-rate", "4", "-b", "4", *backends,
                         "--img-size", "8", "--fit-depths", "10", "16", "22", "--verify-max-depth", "46",
                         "--json", str(out_json))
    assert status == 0
    assert "estimate" in out and "SGD with momentum" in out
    results = {r["kind"]: r for r in json.loads(out_json.read_text())["results"]}
    ours = [r for kind, r in results.items() if kind.startswith("densenet_fast")]
    tv = results["torchvision"]
    assert ours and all(r["depth"] >= tv["depth"] > 0 for r in ours)
    for r in results.values():
        assert r["total_bytes"] <= 4 * 2 ** 20 < r["next_depth_bytes"]
        assert (r["depth"] - 4) % 6 == 0 and r["verified_depth"] > 0


@pytest.mark.slow
def test_max_depth_refuses_a_small_budget_before_measuring(capsys, monkeypatch):
    measured = []
    real = max_depth.measure_step_transient
    monkeypatch.setattr(max_depth, "measure_step_transient", lambda kind, depth, *a: measured.append(depth) or real(
        kind, depth, *a))
    # Below the architecture's floor: refused with nothing measured.
    status, _, err = run(capsys, "max-depth", "--budget", "1MiB")
    assert status == 2 and measured == []
    assert_one_error_line(err, "too small", "smallest model", "DenseNet-BC depth 10")
    floor = max_depth.floor_bytes(4, 4, 8)
    assert floor < 2 ** 20
    # Above the floor, below what depth 10 measures: only depth 10 is measured, then refused.
    status, _, err = run(capsys, "max-depth", "--budget", str(floor), "--growth-rate", "4", "-b", "4",
                         "--img-size", "8")
    assert status == 2 and set(measured) == {10}
    assert_one_error_line(err, "too small", "needs")


def test_parameter_count_matches_the_model():
    for depth, k in ((10, 4), (40, 12), (100, 24)):
        with torch.device("meta"):
            model = densenet_fast.densenet_bc(depth, k)
        params, buffer_bytes = max_depth.bc_counts(depth, k)
        assert params == sum(p.numel() for p in model.parameters())
        assert buffer_bytes == sum(b.numel() * b.element_size() for b in model.buffers())


def test_depth_search_on_a_known_curve():
    total = lambda d: 1000 + 3 * d * d  # noqa: E731
    n = max_depth._largest_fitting_n(total, 1_000_000)
    assert total(6 * n + 4) <= 1_000_000 < total(6 * n + 10)
    assert max_depth._largest_fitting_n(total, 10) == 0


def test_parse_size():
    assert tools.parse_size("12GiB") == 12 * 2 ** 30
    assert tools.parse_size("16GB") == 16 * 10 ** 9
    assert tools.parse_size("1.5G") == int(1.5 * 2 ** 30)
    assert tools.parse_size("500 MiB") == 500 * 2 ** 20


# --- flags: timm's names, defaults in the help, --version -------------------------------------------

def _subparsers() -> dict:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)


def test_timm_flag_names_in_every_command():
    parsers = _subparsers()
    for name, argv in (("bench", ["bench"]), ("max-depth", ["max-depth"]), ("train", ["train"])):
        args = cli.build_parser().parse_args(argv + ["-b", "3", "--img-size", "40", "--device", "cpu"])
        assert (args.batch_size, args.img_size, args.device) == (3, 40, "cpu")
        assert cli.build_parser().parse_args(argv + ["--batch-size", "5"]).batch_size == 5
        old = cli.build_parser().parse_args(argv + ["--batch", "6", "--size", "41"])  # hidden old spellings
        assert (old.batch_size, old.img_size) == (6, 41)
        help_text = parsers[name].format_help()
        assert "--batch-size" in help_text and "--batch " not in help_text and "--size " not in help_text
        default = cli.build_parser().parse_args(argv).device
        assert default == ("cuda" if torch.cuda.is_available() else "cpu")
    for argv in (["bench"], ["train"]):
        args = cli.build_parser().parse_args(argv + ["--amp-dtype", "float16", "--channels-last"])
        assert args.amp and args.amp_dtype == "float16" and args.channels_last  # --amp-dtype implies --amp
        assert cli.build_parser().parse_args(argv + ["--amp"]).amp_dtype == "bfloat16"


def test_every_help_text_shows_its_defaults(capsys):
    for name, parser in _subparsers().items():
        formatter = parser._get_formatter()
        for action in parser._actions:
            if action.help in (None, "==SUPPRESS==") or action.nargs == 0:
                continue  # hidden aliases; on/off flags (off by default)
            assert "(default:" in formatter._get_help_string(action) % vars(action), (name, action.dest)
    assert run(capsys, "bench", "--help")[1].count("(default:") >= 15
    status, out, _ = run(capsys, "max-depth", "--help")
    assert status == 0 and "(default: 12GiB)" in out and "(default: 64)" in out


def test_version(capsys):
    status, out, _ = run(capsys, "--version")
    assert status == 0 and out.strip() == f"densenet-fast {densenet_fast.__version__}"


# --- errors: one line on stderr, exit status 2, before any work ------------------------------------

@pytest.mark.parametrize("argv, fragment", [
    (["bench", "densenet999"], "invalid choice"),
    (["bench", "densenet121", "--depth", "40"], "not both"),
    (["bench", "densenet121", "--img-size", "16"], "too small for densenet121"),
    (["bench", "--size", "16"], "at least 29x29"),
    (["bench", "-b", "1", "--img-size", "32"], "at least 61x61"),
    (["bench", "--depth", "40", "--img-size", "3"], "too small for a DenseNet-BC"),
    (["bench", "--depth", "41"], "6n + 4"),
    (["bench", "--rounds", "0"], "--rounds must be at least 1"),
    (["bench", "-b", "0"], "--batch-size must be at least 1"),
    (["bench", "--backend", "nosuch"], f"unknown backend 'nosuch'; expected one of {', '.join(sorted(_FACTORIES))}"),
    (["bench", "--dtype", "float64", "--amp"], "drop --dtype"),
    (["bench", "--amp", "bf16"], "invalid choice: 'bf16'"),
    (["bench", "--plot", "memory.xyz"], "expected a file name ending in one of"),
    (["bench", "--json", "/nonexistent-folder/out.json"], "folder /nonexistent-folder does not exist"),
    (["bench", "--csv", "/sys/out.csv"], "not writable"),
    (["bench", "--plot", "/sys/out.png"], "not writable"),
    (["bench", "--json", "/tmp"], "is a directory"),
    (["max-depth", "--budget", "12 parsecs"], "not a memory size"),
    (["max-depth", "--budget", "1MiB", "--json", "/nonexistent-folder/d.json"], "does not exist"),
    (["max-depth", "--budget", "1KiB", "-b", "2", "--img-size", "8", "--growth-rate", "4",
      "--fit-depths", "10", "16", "22"], "too small"),
    (["max-depth", "--fit-depths", "10", "16"], "at least 3 different depths"),
    (["max-depth", "--backend", "nosuch"], "unknown backend"),
    (["frobnicate"], "invalid choice"),
])
def test_bad_input_is_one_line_and_status_2(capsys, no_work, argv, fragment):
    status, _, err = run(capsys, *argv)
    assert status == 2
    assert_one_error_line(err, "densenet-fast", fragment)


def test_sys_is_not_writable_here():
    """The precondition of the /sys cases above: even root cannot create a file there."""
    with pytest.raises(OSError):
        open("/sys/densenet-fast-probe", "w")


def test_known_backend_not_built_here(capsys, no_work, monkeypatch):
    from densenet_fast.ops import registry as ops

    def unbuilt():
        raise ImportError("densenet_fast._C was built for torch 0.0")

    monkeypatch.setitem(ops._FACTORIES, "unbuilt", unbuilt)
    monkeypatch.setattr(ops, "_unavailable", {})
    status, _, err = run(capsys, "bench", "--backend", "unbuilt")
    assert status == 2
    assert_one_error_line(err, "backend 'unbuilt' is not available here", "built for torch 0.0")
    assert "unknown" not in err


def test_missing_cli_extra_is_one_line(capsys, no_work, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    status, _, err = run(capsys, *TINY_BENCH, "--plot", "out.png")
    assert status == 2
    assert_one_error_line(err, "--plot needs matplotlib", "pip install 'densenet-fast[cli]'")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda(capsys, no_work):
    for argv in (["train", "--device", "cuda"], ["bench", "--device", "cuda"], ["max-depth", "--device", "cuda"]):
        status, _, err = run(capsys, *argv)
        assert status == 2
        assert_one_error_line(err, "CUDA is not available")


def test_module_entry_point_exit_status():
    """``python -m densenet_fast`` exits with the CLI's status (2 on bad input, no traceback)."""
    proc = subprocess.run([sys.executable, "-m", "densenet_fast", "bench", "--budget"], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2
    assert "densenet-fast: error: unrecognized arguments: --budget" in proc.stderr.splitlines()
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_a_crash_during_measurement_reaches_stderr(tmp_path):
    """A segfault inside a profiled training step: what the step wrote to fd 2 and Python's traceback
    (faulthandler) are on stderr; nothing redirects fd 2 while the model runs."""
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent("""
        import ctypes, os, sys
        import torchvision
        from densenet_fast import cli

        forward = torchvision.models.DenseNet.forward
        calls = []

        def crashing_forward(self, x):
            calls.append(1)
            if len(calls) == 2:  # the second step: the one the profiler measures
                os.write(2, b"native message before the crash\\n")
                ctypes.string_at(0)  # SIGSEGV
            return forward(self, x)

        torchvision.models.DenseNet.forward = crashing_forward
        sys.exit(cli.main(["bench", "--depth", "10", "--growth-rate", "4", "-b", "2", "--img-size", "8",
                           "--backend", "torch"]))
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -11, proc.stderr
    assert "native message before the crash" in proc.stderr
    assert "Fatal Python error: Segmentation fault" in proc.stderr and "crashing_forward" in proc.stderr


def test_the_profiler_log_is_filtered_and_nothing_else(capfd):
    from densenet_fast.memory import peak_memory

    x = torch.randn(16, 16)
    assert peak_memory(lambda: print("written by the work", file=sys.stderr, flush=True) or x * 2) > 0
    err = capfd.readouterr().err
    assert "written by the work" in err
    assert "profiler_start" not in err and "profiler_stop" not in err and "gpuGetDeviceCount" not in err


def test_no_command_runs_the_main_job(monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "main_job", lambda: calls.append("main job") or 0)
    assert cli.main([]) == 0 and calls == ["main job"]


def test_the_main_jobs_check_against_torchvision(capsys):
    cli.check_against_torchvision()
    out = capsys.readouterr().out
    assert out.startswith("float64 check against torchvision") and "outputs" in out
