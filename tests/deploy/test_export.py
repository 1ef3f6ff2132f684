import inspect
import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx
from timm.layers import _fx as timm_fx

import vitcc.deploy.export as export_mod
from vitcc.errors import VerificationError, VitccError
from vitcc.deploy.export import export_onnx

from conftest import hand_vit, no_warnings, tiny_hf, tiny_swin, tiny_vit


class TimmTracer(torch.fx.Tracer):
    """fx tracer honouring timm's notrace modules (leaves) and functions (autowrapped)."""

    def __init__(self):
        fns = tuple(f for f in timm_fx.get_notrace_functions() if callable(f))
        super().__init__(autowrap_functions=fns)
        self.leaves = tuple(timm_fx.get_notrace_modules())

    def is_leaf_module(self, m, qualname):
        return isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


def timm_trace(model):
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    graph = TimmTracer().trace(model, concrete_args=concrete)
    return torch.fx.GraphModule(model, graph)


def check_result(res, path, atol=1e-4):
    assert res["path"] == str(path)
    assert res["checker"] == "ok" and res["onnxruntime"] == "ok"
    assert isinstance(res["opset"], int) and res["opset"] >= 17
    assert 0.0 <= res["max_abs_error"] <= atol
    # one self-contained file: no external-data side file, no leftover temp file
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    assert onnx.load(str(path), load_external_data=False).graph.initializer


def test_export_vit_dynamic_batch(tmp_path):
    model, path = tiny_vit(), tmp_path / "vit.onnx"
    res = export_onnx(model, (torch.randn(2, 3, 32, 32),), path)
    check_result(res, path)
    assert res["dynamic_batch"] is True
    x = torch.randn(5, 3, 32, 32)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-3, atol=1e-4)


def test_export_vit_graph_module(tmp_path):
    gm = timm_trace(tiny_vit())
    assert any(n.op == "call_module" for n in gm.graph.nodes)
    assert any(n.target is torch.nn.functional.scaled_dot_product_attention
               or "scaled_dot_product_attention" in str(n.target) for n in gm.graph.nodes)
    path = tmp_path / "vit_gm.onnx"
    check_result(export_onnx(gm, (torch.randn(1, 3, 32, 32),), path), path)


def test_export_swin_graph_module_with_opset(tmp_path):
    gm, path = timm_trace(tiny_swin(depths=(1, 1), num_heads=(1, 2))), tmp_path / "swin.onnx"
    res = export_onnx(gm, (torch.randn(1, 3, 56, 56),), path, opset=18)
    check_result(res, path)
    assert res["opset"] == 18


def test_mismatch_raises_and_leaves_no_file(tmp_path, monkeypatch):
    real_run = export_mod._run_onnxruntime
    monkeypatch.setattr(export_mod, "_run_onnxruntime",
                        lambda sess, inputs: [o + 1.0 for o in real_run(sess, inputs)])
    path = tmp_path / "bad.onnx"
    with pytest.raises(VerificationError, match="differs"):
        export_onnx(tiny_vit(), (torch.randn(1, 3, 32, 32),), path)
    assert list(tmp_path.iterdir()) == []


def test_failure_keeps_existing_file_and_restores_mode(tmp_path, monkeypatch):
    def boom(path):
        raise onnx.checker.ValidationError("broken")
    monkeypatch.setattr(export_mod.onnx.checker, "check_model", lambda *a, **k: boom(a[0]))
    path = tmp_path / "m.onnx"
    path.write_bytes(b"previous")
    model = torch.nn.Sequential(torch.nn.Linear(4, 2)).train()
    with pytest.raises(VitccError, match="broken"):
        export_onnx(model, (torch.randn(3, 4),), path)
    assert model.training
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"] and path.read_bytes() == b"previous"


class PinnedBatch(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.view(2, 4))  # hard-codes the batch size


def test_pinned_batch_is_reported_static(tmp_path):
    path = tmp_path / "pinned.onnx"
    res = export_onnx(PinnedBatch().eval(), (torch.randn(2, 4),), path)
    check_result(res, path)
    assert res["dynamic_batch"] is False


def test_missing_output_directory(tmp_path):
    with pytest.raises(VitccError, match="does not exist"):
        export_onnx(PinnedBatch(), (torch.randn(2, 4),), tmp_path / "nope" / "m.onnx")


# ---------------------------------------------------------------- .pt2: the compact program without vitcc
FRESH = """
import sys, torch
data = torch.load(sys.argv[3], weights_only=True)
m = torch.export.load(sys.argv[1]).module()
for x, want in zip(data["inputs"], data["outputs"]):
    torch.testing.assert_close(m(x), want, rtol=1e-5, atol=1e-6)
assert "vitcc" not in sys.modules and "transformers" not in sys.modules
import vitcc  # an HF program names transformers' output class: vitcc.load imports the module that defines it
out = vitcc.load(sys.argv[2])(data["hf_input"])
torch.testing.assert_close(out.logits, data["hf_logits"], rtol=1e-5, atol=1e-6)
print("ok", [tuple(x.shape) for x in data["inputs"]], type(out).__name__)
"""


def test_pt2_round_trip_in_a_fresh_process(tmp_path, compact_deit):
    import vitcc
    r = vitcc.compile(hand_vit(qkv="mha", cls_token=False, patches="tensor_unfold"), sparsity=0.4,
                      example_inputs=(torch.randn(1, 3, 32, 32),))
    vitcc.save(r.module, tmp_path / "small.pt2")
    inputs = [torch.randn(n, 3, 32, 32) for n in (1, 5)]
    with torch.no_grad():
        data = {"inputs": inputs, "outputs": [r.module(x) for x in inputs], "hf_input": inputs[1],
                "hf_logits": compact_deit[1].module(inputs[1]).logits}
    torch.save(data, tmp_path / "data.pt")
    args = [str(tmp_path / "small.pt2"), str(compact_deit[2]), str(tmp_path / "data.pt")]
    proc = subprocess.run([sys.executable, "-c", FRESH, *args], capture_output=True, text=True, timeout=300,
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ok [(1, 3, 32, 32), (5, 3, 32, 32)] DeiTForImageClassificationWithTeacherOutput" in proc.stdout


def test_a_saved_program_is_named_pt2_and_loads_without_warnings(tmp_path):
    import shutil

    import vitcc
    r = vitcc.compile(tiny_vit(), sparsity=0.3, example_inputs=(torch.randn(1, 3, 32, 32),))
    for name in ("small.pt", "small.txt", "small", "small.PT2"):
        with pytest.raises(VitccError, match=r"named \.pt2 .*; name it small\.pt2"):
            vitcc.save(r.module, tmp_path / name)
    assert list(tmp_path.iterdir()) == []
    path = tmp_path / "small.pt2"
    vitcc.save(r.module, path)
    x = torch.randn(3, 3, 32, 32)
    with no_warnings():
        with warnings.catch_warnings():  # torch 2.11's own loader warns about its read-only byte buffers
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            torch.testing.assert_close(torch.export.load(str(path)).module()(x), r.module(x))
        torch.testing.assert_close(vitcc.load(path)(x), r.module(x))
    shutil.copy(path, tmp_path / "renamed.pt")  # what `-o small.pt` used to write: the check does see the warning
    with pytest.raises(AssertionError, match="ending in .pt2"):
        with no_warnings():
            torch.export.load(str(tmp_path / "renamed.pt"))


# ---------------------------------------------------------------- ONNX for GPU runtimes

def _graph_ops(path) -> list[str]:
    return [n.op_type for n in onnx.load(str(path)).graph.node]


@pytest.mark.parametrize("opset", [None, 17])
def test_onnx_names_dynamic_batch_and_one_layernorm_op(tmp_path, opset):
    """The compact model as `vitcc compile --onnx` writes it: `images` in, `logits` out, any batch, and each
    LayerNorm one LayerNormalization op (TensorRT keeps that fused op in fp32), not a ReduceMean chain."""
    import vitcc
    model = tiny_vit()
    compact = vitcc.compile(model, sparsity=0.3, example_inputs=(torch.randn(1, 3, 32, 32),)).module
    path = tmp_path / "small.onnx"
    res = export_onnx(compact, (torch.randn(1, 3, 32, 32),), path, opset=opset)
    assert res["inputs"] == ["images"] and res["outputs"] == ["logits"] and res["dynamic_batch"] is True
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    assert [i.name for i in graph.input] == ["images"] and [o.name for o in graph.output] == ["logits"]
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.HasField("dim_value")
    assert res["opset"] >= 17 and (opset is None or res["opset"] == opset)
    ops = _graph_ops(path)
    norms = sum(isinstance(m, torch.nn.LayerNorm) for m in model.modules())
    assert ops.count("LayerNormalization") == norms == 5 and "ReduceMean" not in ops
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        x = torch.randn(n, 3, 32, 32)
        (logits,) = sess.run(["logits"], {"images": x.numpy()})
        with torch.no_grad():
            np.testing.assert_allclose(logits, compact(x).numpy(), rtol=1e-3, atol=1e-4)
        assert logits.shape == (n, 10)


class TwoOutputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm, self.fc = torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)

    def forward(self, tokens, scale):
        features = self.norm(tokens) * scale
        return {"logits": self.fc(features), "features": features}, features.sum(-1)


def test_onnx_names_several_outputs_by_key_or_position(tmp_path):
    model, path = TwoOutputs().eval(), tmp_path / "two.onnx"
    inputs = (torch.randn(2, 8), torch.randn(2, 1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = export_onnx(model, inputs, path)
    assert not [w for w in caught if "axis name" in str(w.message)]  # both inputs share the one batch axis
    assert res["inputs"] == ["tokens", "scale"] and res["dynamic_batch"] is True
    assert res["outputs"] == ["output_0_logits", "output_0_features", "output_1"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = (torch.randn(5, 8), torch.randn(5, 1))
    got = dict(zip(res["outputs"], sess.run(None, {"tokens": x[0].numpy(), "scale": x[1].numpy()})))
    with torch.no_grad():
        want, summed = model(*x)
    for name, value in (("output_0_logits", want["logits"]), ("output_0_features", want["features"]),
                        ("output_1", summed)):
        np.testing.assert_allclose(got[name], value.numpy(), rtol=1e-3, atol=1e-5)


def test_onnx_names_an_hf_output_class_by_its_fields(tmp_path, compact_deit):
    path = tmp_path / "deit.onnx"
    res = export_onnx(compact_deit[1].module, (torch.randn(1, 3, 32, 32),), path)
    assert res["inputs"] == ["images"] and res["outputs"] == ["logits", "cls_logits", "distillation_logits"]
    ops = _graph_ops(path)
    assert ops.count("LayerNormalization") == 5 and "ReduceMean" not in ops


def test_opset_without_layernormalization_is_refused(tmp_path):
    with pytest.raises(VitccError, match="opset 16 has no LayerNormalization.*opset 17 or later"):
        export_onnx(tiny_vit(), (torch.randn(1, 3, 32, 32),), tmp_path / "m.onnx", opset=16)
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- windowed attention (Swin) with a dynamic batch

class BiasedAttention(torch.nn.Module):
    """The pattern that broke Swin's export: SDPA with a mask made from a parameter (a relative position bias),
    then `transpose(1, 2).reshape(...)`. On CPU the mask's requires_grad picks SDPA's kernel and so the strides
    of its output; the exporter decomposed the reshape into a view under one kernel and re-ran it under the
    other ("Cannot view a tensor ..."), at any batch, static or dynamic."""

    def __init__(self, heads=2, tokens=9, dim=8):
        super().__init__()
        self.heads, self.qkv, self.proj = heads, torch.nn.Linear(heads * dim, 3 * heads * dim), \
            torch.nn.Linear(heads * dim, 4)
        self.bias = torch.nn.Parameter(torch.randn(heads, tokens, tokens))

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=self.bias.unsqueeze(0))
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


def run_at(path, model, sizes, shape):
    """onnxruntime against PyTorch at each batch size in `sizes` (the export was checked at the example's)."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in sizes:
        x = torch.randn(n, *shape)
        (got,) = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
        with torch.no_grad():
            want = model(x)
        want = getattr(want, "logits", want)
        assert got.shape == tuple(want.shape) and got.shape[0] == n
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-3, atol=1e-4)


def test_attention_with_a_parameter_mask_exports(tmp_path):
    model, path = BiasedAttention().eval(), tmp_path / "attn.onnx"
    res = export_onnx(model, (torch.randn(1, 9, 16),), path)
    assert res["dynamic_batch"] is True and res["inputs"] == ["x"]
    run_at(path, model, (1, 3), (9, 16))
    assert all(p.requires_grad for p in model.parameters()) and torch.is_grad_enabled()


def tv_swin():
    SwinTransformer = pytest.importorskip("torchvision.models.swin_transformer").SwinTransformer
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 4], window_size=[7, 7],
                           num_classes=10).eval()


def swin_models():
    import vitcc

    def compact():
        return vitcc.compile(tiny_swin(), sparsity=0.3, example_inputs=(torch.randn(1, 3, 56, 56),)).module
    return {"timm": (tiny_swin, 56), "timm-compact": (compact, 56), "hf": (lambda: tiny_hf("swin"), 32),
            "torchvision": (tv_swin, 56)}


@pytest.mark.parametrize("kind", ["timm", "timm-compact", "hf", "torchvision"])
def test_swin_exports_with_a_dynamic_batch(tmp_path, kind):
    """Shifted windows, relative position bias, patch merging: traced at a batch of one, exported with a batch
    axis, right at batches 1 and 3, each LayerNorm one LayerNormalization op."""
    make, size = swin_models()[kind]
    model, path = make(), tmp_path / "swin.onnx"
    res = export_onnx(model, (torch.randn(1, 3, size, size),), path)
    check_result(res, path)
    assert res["dynamic_batch"] is True and res["inputs"] == ["images"] and res["outputs"] == ["logits"]
    ops = _graph_ops(path)  # 11 LayerNorms: 4 blocks of 2, the patch embedding's, the patch merge's, the last
    assert ops.count("LayerNormalization") == 11 and "Sqrt" not in ops and "Pow" not in ops
    run_at(path, model, (1, 3), (3, size, size))


class PinnedToOne(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x.view(1, 4))


def test_a_model_pinned_to_batch_one_exports_static(tmp_path):
    path = tmp_path / "one.onnx"
    res = export_onnx(PinnedToOne().eval(), (torch.randn(1, 4),), path)
    check_result(res, path)
    assert res["dynamic_batch"] is False


@pytest.mark.slow
def test_cli_swin_tiny_224_writes_a_dynamic_batch_onnx(tmp_path, capsys):
    from vitcc.cli import run
    out, path = tmp_path / "s.pt2", tmp_path / "s.onnx"
    assert run(["compile", "timm:swin_tiny_patch4_window7_224", "--sparsity", "0.3", "-o", str(out),
                "--onnx", str(path)]) == 0
    assert "images -> logits, dynamic batch" in capsys.readouterr().out
    import vitcc
    ops = _graph_ops(path)
    assert ops.count("LayerNormalization") == 29 and "Pow" not in ops
    run_at(path, vitcc.load(out), (1, 3), (3, 224, 224))
