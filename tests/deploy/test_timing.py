"""vitcc.deploy.timing: the process as vitcc times a model (the timers themselves: tests/search/test_latency.py)."""
import resource
import subprocess
import sys

import pytest
import torch

from vitcc.deploy.timing import (flushed_subnormals, heap_policy, onnx_session, steady_heap, subnormal_policy,
                                 subnormals_flushed, timing_on)

from conftest import can_flush

glibc_only = pytest.mark.skipif(not heap_policy().startswith("glibc"), reason="malloc's settings are glibc's")
SUBNORMAL = 1e-39  # float32's smallest normal is 1.2e-38


PAGES = (1 << 24) // resource.getpagesize()  # of a 16 MiB block


def faults_per_call(calls: int = 4) -> float:
    """Minor page faults per allocation of a 16 MiB block, written and freed (after a warm-up): glibc
    maps a block that size afresh on every call, all its pages fault, unless freed memory is kept."""
    for _ in range(8):  # the first few may land on free chunks whose pages were given back (malloc_trim)
        torch.empty(1 << 22).fill_(1.0)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        torch.empty(1 << 22).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


@glibc_only
def test_steady_heap_keeps_freed_blocks_for_the_next_call():
    with steady_heap() as applied:
        assert applied
        assert faults_per_call() < PAGES / 2  # (a sandbox's kernel may still fault some: 0 to 1/4 seen)


@glibc_only
def test_steady_heap_nests_and_only_the_last_out_restores():
    with steady_heap():
        with steady_heap():
            pass
        assert faults_per_call() < PAGES / 2  # the inner block's exit left the outer one's setting


def test_timing_on_sets_threads_on_any_device_and_restores_them():
    before = torch.get_num_threads()
    for device in ("cpu", "meta"):
        with timing_on(device, 1) as n:
            assert n == torch.get_num_threads() == 1
        assert torch.get_num_threads() == before


def test_an_allocator_the_user_chose_is_left_as_it_is(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    with steady_heap() as applied:
        assert not applied
    assert heap_policy() == "malloc as the process sets it (MALLOC_MMAP_THRESHOLD_=65536)"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    assert heap_policy() == "malloc as the process sets it (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)"


def test_a_gpu_timing_records_its_caching_allocator():
    assert heap_policy("cuda:1") == "PyTorch's CUDA caching allocator"


def test_cuda_events_time_every_call_in_a_rotating_order(cuda_events_on_the_host_clock):
    import statistics
    import time
    from vitcc.deploy.timing import interleaved
    calls = []
    fns = {"short": lambda: (calls.append("short"), time.sleep(0.003)),
           "long": lambda: (calls.append("long"), time.sleep(0.012))}
    out = interleaved(fns, rounds=6, warmup=1, device="cuda")
    assert {k: sorted(v) for k, v in out.items()} == {"short": ["wall"], "long": ["wall"]}
    assert len(out["short"]["wall"]) == len(out["long"]["wall"]) == 6
    assert 2.0 < statistics.median(out["long"]["wall"]) / statistics.median(out["short"]["wall"]) < 5.0  # 4 as slept
    # each round: one untimed call of the one before the first, then both, the first rotating
    assert calls[2:8] == ["long", "short", "long", "short", "long", "short"]


def test_one_reference_timed_beside_many():
    import time
    from vitcc.deploy.timing import time_ratios
    order = []
    fns = [lambda: (order.append("a"), time.sleep(0.012)), lambda: (order.append("b"), time.sleep(0.003))]
    (double, half), ref_ms = time_ratios(fns, lambda: (order.append("ref"), time.sleep(0.006)), warmup=1,
                                         samples=4, budget_ms=None)
    assert 1.4 < double < 2.5 and 0.4 < half < 0.8 and 5.9 < ref_ms < 12.0  # 2, 0.5 and 6 as slept
    assert order[3:9] == ["a", "b", "ref", "ref", "b", "a"]  # after the warm-up, every round, reversed every other


@can_flush
def test_cpu_timing_flushes_subnormals_and_restores_the_mode_after():
    assert not subnormals_flushed()
    with timing_on("cpu", 1):
        assert subnormals_flushed() and (torch.full((4,), SUBNORMAL) * 2).eq(0).all()
    assert not subnormals_flushed() and (torch.full((4,), SUBNORMAL) * 2).ne(0).all()
    with timing_on("meta", 1):  # a GPU timing leaves the CPU's mode alone
        assert not subnormals_flushed()


@can_flush
def test_flushing_nests_and_a_mode_set_before_stays():
    with flushed_subnormals():
        with flushed_subnormals() as applied:
            assert applied
        assert subnormals_flushed()  # the inner block's exit left the outer one's mode
    assert not subnormals_flushed()
    torch.set_flush_denormal(True)  # the caller's own choice (`vitcc` sets it at its start) outlives a timing
    try:
        with flushed_subnormals():
            pass
        assert subnormals_flushed()
    finally:
        torch.set_flush_denormal(False)


@pytest.fixture(scope="module")
def onnx_file(tmp_path_factory):
    from vitcc.deploy.export import export_onnx
    path = tmp_path_factory.mktemp("onnx") / "m.onnx"
    export_onnx(torch.nn.Sequential(torch.nn.Linear(4, 4)), (torch.randn(1, 4),), path)
    return path


def test_onnxruntime_sessions_flush_subnormals_as_torch_does(onnx_file):
    options = onnx_session(onnx_file, 1).get_session_options()
    assert options.get_session_config_entry("session.set_denormal_as_zero") == "1"


@can_flush
@pytest.mark.parametrize("vitcc_session", [False, True])
def test_the_first_onnxruntime_session_of_a_process_keeps_the_thread_s_subnormal_mode(onnx_file, vitcc_session):
    """onnxruntime sets the calling thread's mode once, at a process's first session (off unless asked): vitcc's
    sessions put it back (a process has one first session, hence a process per case)."""
    session = (f"timing.onnx_cpu_session({str(onnx_file)!r})" if vitcc_session else
               f"onnxruntime.InferenceSession({str(onnx_file)!r}, providers=['CPUExecutionProvider'])")
    script = ("import torch, onnxruntime, vitcc.deploy.timing as timing\n"
              f"torch.set_flush_denormal(True)\n{session}\nprint(timing.subnormals_flushed())\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == str(vitcc_session)


def test_a_gpu_timing_records_subnormals_as_the_gpu_computes_them():
    assert subnormal_policy("cuda") == "subnormals as the GPU computes them"
