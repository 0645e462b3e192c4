"""Update-step memory on the CPU platform: a resettable peak-RSS window and the main job's summary line."""

import sys

import pytest
import torch

from tip_verl.verl_adapter.console_metrics import learning_line
from tip_verl.verl_adapter.cpu.platform import CPUDeviceModule, UpdateMemoryWindow

MiB = 2**20
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="VmHWM / clear_refs are Linux files")


@linux_only
def test_window_measures_what_the_step_allocates_and_forgets_earlier_peaks():
    with UpdateMemoryWindow() as big:
        x = torch.ones(256 * MiB // 4)  # 256 MiB, written (resident)
        del x
    # the floor has slack: the kernel may reclaim a few cold pages of the process during the window (seen: -120 KiB)
    assert 240 * MiB <= big.increase_bytes <= 256 * MiB + 64 * MiB
    assert big.peak_bytes >= big.increase_bytes
    with UpdateMemoryWindow() as small:  # a new window must not carry the 256 MiB peak above
        y = torch.ones(8 * MiB // 4)
        del y
    assert small.increase_bytes < 48 * MiB
    assert small.peak_bytes < big.peak_bytes


@linux_only
def test_device_module_peak_is_reset_like_torch_cuda():
    dev = CPUDeviceModule()
    x = torch.ones(128 * MiB // 4)
    del x
    high = dev.max_memory_allocated()
    dev.reset_peak_memory_stats()
    assert dev.max_memory_allocated() <= high
    assert abs(dev.max_memory_allocated() - dev.memory_allocated()) < 32 * MiB  # peak := current RSS


def test_window_metrics_are_in_verls_per_micro_batch_list_form():
    window = UpdateMemoryWindow()
    metrics = {}
    window.add_metrics(metrics)  # never entered: nothing measured, nothing reported
    assert metrics == {}
    window.peak_bytes, window.increase_bytes = 3 * 2**30, 2**29
    window.add_metrics(metrics)
    assert metrics == {"perf/update_peak_memory_gb": [3.0], "perf/update_memory_increase_gb": [0.5]}


def _steps(**last):
    val = "val-core/tiny_addition/acc/mean@4"
    step = {"tip/kept_count": 50.0, "tip/valid_count": 100.0}
    return {0: {val: 0.25}, 1: dict(step), 2: {**step, **last, val: 0.5}}


def test_learning_line_reports_the_update_step_memory():
    line = learning_line(_steps(**{"actor/perf/update_peak_memory_gb": 1.234,
                                   "actor/perf/update_memory_increase_gb": 0.056,
                                   "actor/perf/max_memory_allocated_gb": 9.0}), tag="t")
    assert line == ("[t] accuracy 0.25 -> 0.50 (+0.25; verl validation, 4 samples per test prompt at T=1) in 2 steps, "
                    "trained on 50% of response tokens (100 of 200), update-step peak memory 1.23 GiB, of which "
                    "0.06 GiB allocated by the step (actor/perf/update_peak_memory_gb, update_memory_increase_gb)")


def test_learning_line_falls_back_to_the_process_peak():
    line = learning_line(_steps(**{"actor/perf/max_memory_allocated_gb": 1.5}), tag="t")
    assert line.endswith(", actor process peak memory 1.50 GiB (actor/perf/max_memory_allocated_gb)")
