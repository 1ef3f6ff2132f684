"""Devices: --device resolution and refusals, exact float32 for verify, running out of device memory, a graph
moved between devices, the captured attention. The CUDA test at the end skips without a GPU (bench's modes:
tests/deploy/test_runners.py)."""
import pytest
import torch

import vitcc
import vitcc.passes  # noqa: F401  (declares the built-in passes before a test patches the declarations)
from vitcc.cli import run
from vitcc.devices import exact_float32, failure_as_line, moved_copy, out_of_memory, resolve_device, to_device
from vitcc.errors import VitccError, first_line
from vitcc.frontend.capture import capture
from vitcc.pipeline.pass_base import Pass, register_pass

from conftest import image, tiny_vit

SHAPE = ["--input-shape", "1,3,32,32"]
QUICK = ["--rounds", "2", "--warmup", "1", "--threads", "1"]
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(tiny_vit(), path)
    return path


def listing(folder):
    return sorted(p.name for p in folder.iterdir())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1, err
    return err


# ------------------------------------------------------------------------------------------ resolution

@pytest.mark.parametrize("spec", ["cpu", "CPU", " cpu ", None, torch.device("cpu")])
def test_cpu_resolves(spec):
    assert resolve_device(spec) == torch.device("cpu")


@pytest.mark.parametrize("spec, message", [("gpu", "unknown --device 'gpu'"), ("cuda:x", "unknown --device"),
                                           ("cuda:-1", "unknown --device"), ("cpu:1", "one CPU device")])
def test_bad_device_names(spec, message):
    with pytest.raises(VitccError, match=message):
        resolve_device(spec)


@no_cuda
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_refused_without_cuda(spec):
    with pytest.raises(VitccError, match="no CUDA device.*use --device cpu"):
        resolve_device(spec)


def test_cuda_index_checked_against_the_devices_there_are(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(VitccError, match=r"2 CUDA device\(s\), cuda:0 to cuda:1"):
        resolve_device("cuda:2")


def test_under_torchrun_cuda_is_the_local_rank_and_naming_it_is_accepted(monkeypatch):
    """A process's own device comes back as cuda:LOCAL_RANK and is resolved again on its way (the compile's
    model device, the latency table's): that must pass; another rank's device is refused."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert resolve_device("cuda") == resolve_device("cuda:1") == resolve_device(torch.device("cuda", 1)) \
        == torch.device("cuda", 1)
    with pytest.raises(VitccError, match="every process uses cuda:LOCAL_RANK; pass --device cuda"):
        resolve_device("cuda:0")


@no_cuda
@pytest.mark.parametrize("command, extra, outputs", [
    ("compile", [], ["-o", "small.pt2", "--report", "r.json"]),
    ("bench", ["--sparsity", "0.5"], ["--json", "b.json"]),
    ("profile", [], ["--json", "p.json"]),
    ("evaluate", ["--data", "digits"], []),
])
def test_every_command_refuses_cuda_without_one_in_one_line(tmp_path, model_file, capsys, monkeypatch, command,
                                                            extra, outputs):
    monkeypatch.chdir(tmp_path)
    before = listing(tmp_path)
    assert run([command, str(model_file), "--device", "cuda", *extra, *outputs, *SHAPE]) == 2
    assert "--device cuda: this machine has no CUDA device" in one_error_line(capsys)
    assert listing(tmp_path) == before


# ------------------------------------------------------------------------------------------ precision

NEW_API = hasattr(torch.backends.cuda.matmul, "fp32_precision")  # torch >= 2.9


def precision_settings():
    """Every float32 precision setting, each as torch lets it be read (legacy flags it refuses: 'refused')."""
    b = torch.backends
    readers = {"matmul_precision": torch.get_float32_matmul_precision,
               "matmul_allow_tf32": lambda: b.cuda.matmul.allow_tf32,
               "cudnn_allow_tf32": lambda: b.cudnn.allow_tf32}
    if NEW_API:
        for name, h in {"generic": b, "cuda_matmul": b.cuda.matmul, "cudnn": b.cudnn, "cudnn_conv": b.cudnn.conv,
                        "mkldnn_matmul": b.mkldnn.matmul}.items():
            readers[name] = lambda h=h: h.fp32_precision
    out = {}
    for name, read in readers.items():
        try:
            out[name] = read()
        except RuntimeError:
            out[name] = "refused"
    return out


@pytest.fixture
def restore_precision():
    """The process's precision settings as they were before the test, whatever it set."""
    b = torch.backends
    handles = [b, b.cuda.matmul, b.cudnn, b.cudnn.conv, b.cudnn.rnn, b.mkldnn, b.mkldnn.matmul] if NEW_API else []
    saved = [h.fp32_precision for h in handles]
    legacy = torch.get_float32_matmul_precision(), b.cudnn.allow_tf32
    yield
    torch.set_float32_matmul_precision(legacy[0])
    b.cudnn.allow_tf32 = legacy[1]
    for h, v in zip(handles, saved):
        h.fp32_precision = v


def set_high():  # what users write for TF32 matmuls
    torch.set_float32_matmul_precision("high")


def set_new_api_tf32():  # torch >= 2.9's way; the legacy flags then refuse to be read
    torch.backends.fp32_precision = "tf32"
    torch.backends.cuda.matmul.fp32_precision = "tf32"


@pytest.mark.parametrize("user_setting", [set_high, set_new_api_tf32], ids=["legacy-high", "new-api-tf32"])
def test_exact_float32_turns_off_reduced_precision_in_both_apis_and_restores_it(user_setting, restore_precision):
    """Inside, torch's legacy flags agree with the new ones (torch refuses to read legacy flags that disagree,
    and torch.compile and cuBLAS read them); after, every setting is what the user left."""
    if user_setting is set_new_api_tf32 and not NEW_API:
        pytest.skip("torch < 2.9 has only the legacy flags")
    user_setting()
    before = precision_settings()
    with exact_float32():
        inside = precision_settings()
    assert inside["matmul_precision"] == "highest"
    assert inside["matmul_allow_tf32"] is False and inside["cudnn_allow_tf32"] is False
    if NEW_API:
        assert inside["cuda_matmul"] == inside["cudnn_conv"] == inside["mkldnn_matmul"] == "ieee"
    assert precision_settings() == before


def test_exact_float32_restores_after_an_error():
    before = torch.get_float32_matmul_precision()
    with pytest.raises(ZeroDivisionError), exact_float32():
        1 / 0
    assert torch.get_float32_matmul_precision() == before


# ------------------------------------------------------------------------------------ out of memory

@pytest.fixture
def oom_pass(declared_passes):
    """A method pass that runs out of device memory, as a large model or --batch does on a GPU."""

    @register_pass("test-oom")
    class OutOfMemory(Pass):
        def run(self, program):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total "
                                         "capacity of 139.81 GiB of which 1.20 GiB is free.")
    return "magnitude,test-oom"


def test_compile_out_of_memory_is_one_line_naming_what_to_lower(tmp_path, model_file, capsys, oom_pass):
    before = listing(tmp_path)
    code = run(["compile", str(model_file), "--passes", oom_pass, "-o", str(tmp_path / "small.pt2"),
                "--report", str(tmp_path / "r.json"), *SHAPE])
    assert code == 2
    err = one_error_line(capsys)
    assert "out of memory on cuda:0" in err and "--input-shape" in err and "--device cpu" in err
    assert listing(tmp_path) == before


def test_bench_out_of_memory_names_batch(tmp_path, model_file, capsys, oom_pass):
    before = listing(tmp_path)
    code = run(["bench", str(model_file), "--sparsity", "0.5", "--passes", oom_pass, "--json",
                str(tmp_path / "b.json"), *QUICK, *SHAPE])
    assert code == 2
    assert "lower --batch" in one_error_line(capsys)
    assert listing(tmp_path) == before


def test_out_of_memory_anywhere_else_is_one_line_too(model_file, capsys, monkeypatch):
    import sys
    app = sys.modules["vitcc.cli.app"]  # (vitcc.cli.app the attribute is the typer app)

    def load(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...")
    monkeypatch.setattr(app, "_load", load)
    assert run(["inspect", str(model_file), *SHAPE]) == 2
    assert "out of memory on cuda:0" in one_error_line(capsys)


def test_out_of_memory_is_found_behind_wrapping_errors():
    oom = torch.OutOfMemoryError("CUDA out of memory")
    try:
        try:
            raise oom
        except RuntimeError as e:
            raise RuntimeError("pass 'verify' failed after [analyze]") from e
    except RuntimeError as wrapped:
        assert out_of_memory(wrapped) is oom
    assert out_of_memory(RuntimeError("no")) is None


def test_a_failure_becomes_one_line_but_out_of_memory_goes_on_to_say_what_to_lower():
    with pytest.raises(VitccError, match="^cannot run: shape mismatch$") as info:
        with failure_as_line(lambda e: f"cannot run: {first_line(e)}"):
            raise RuntimeError("shape mismatch\n  traceback lines")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    with pytest.raises(torch.OutOfMemoryError):
        with failure_as_line(lambda e: pytest.fail("an out of memory error read as the model's failure")):
            raise torch.OutOfMemoryError("CUDA out of memory")


# ------------------------------------------------------------------------------- moving a graph

class MadeOnItsDevice(torch.nn.Module):
    """Creates a tensor in forward where its input is: torch.export records that device in the graph."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x) + torch.arange(x.shape[-1], device=x.device, dtype=x.dtype)


def test_to_device_retargets_the_devices_a_graph_names():
    x = torch.randn(2, 8)
    gm = capture(MadeOnItsDevice().eval(), (x,))
    named = [n for n in gm.graph.nodes if n.kwargs.get("device") is not None]
    assert named and all(n.kwargs["device"] == torch.device("cpu") for n in named)
    to_device(gm, "meta")  # a device that runs shapes only: a node still naming the CPU would fail there
    assert all(n.kwargs["device"] == torch.device("meta") for n in named)
    assert all(t.device.type == "meta" for t in gm.state_dict().values())
    assert gm(x.to("meta")).shape == (2, 8)


def test_moved_copy_leaves_the_original_where_it_is():
    x = torch.randn(2, 8)
    gm = capture(MadeOnItsDevice().eval(), (x,))
    meta = moved_copy(gm, "meta")
    assert all(t.device.type == "meta" for t in meta.state_dict().values())
    assert all(t.device.type == "cpu" for t in gm.state_dict().values())
    assert gm(x).device.type == "cpu"  # the original still runs where it was
    assert meta(x.to("meta")).device.type == "meta"


# ---------------------------------------------------------------------------- the captured attention

def test_capture_keeps_one_device_generic_attention_op_per_block():
    """torch.compile and the GPU pick the fused attention kernel from aten.scaled_dot_product_attention: the
    captured and the compact graph must keep it whole, not a CPU kernel or its decomposition."""
    m = tiny_vit(depth=2)
    result = vitcc.compile(m, "magnitude", sparsity=0.5, example_inputs=(image(1),), align=8)
    for gm in (result.program.original, result.module):
        targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
        assert targets.count("aten.scaled_dot_product_attention.default") == 2
        assert not any("flash_attention" in t or "efficient_attention" in t or "_softmax" in t for t in targets)
    assert result.report["device"] == "cpu"


# ------------------------------------------------------------------------------------------ on a GPU

@pytest.mark.cuda
def test_compile_on_cuda_returns_a_verified_compact_model_there(tmp_path, restore_precision):
    set_high()  # as GPU scripts do: verify's exact float32 must not leave cuBLAS with two TF32 settings that disagree
    m = tiny_vit().cuda()
    result = vitcc.compile(m, "magnitude", sparsity=0.5, example_inputs=(image(1),), align=8)  # a CPU example
    assert result.report["device"].startswith("cuda") and result.report["max_abs_error"] < 1e-3
    assert all(t.is_cuda for t in result.module.state_dict().values())
    assert result.module(image(2).cuda()).is_cuda
    vitcc.save(result.module, tmp_path / "small.pt2")  # written from a CPU copy: loads on any machine
    back = vitcc.load(tmp_path / "small.pt2")
    assert all(t.device.type == "cpu" for t in back.state_dict().values())
    with torch.no_grad(), exact_float32():
        assert torch.allclose(back(image(2)), result.module(image(2).cuda()).cpu(), atol=1e-4, rtol=1e-4)


def test_a_training_copy_on_another_device_runs_there():
    """Calibration and sparsity training copy the graph to the training device: the devices its nodes name
    move with it, as with `to_device`."""
    from vitcc.training.distributed import device_copy
    x = torch.randn(2, 8)
    gm = capture(MadeOnItsDevice().eval(), (x,))
    assert device_copy(gm, torch.device("meta"))(x.to("meta")).device.type == "meta"
    assert device_copy(gm, torch.device("cpu")) is gm
