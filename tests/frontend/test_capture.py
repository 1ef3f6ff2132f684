"""Capture with torch.export: the aten graph matches eager, keeps a dynamic batch, and failures are one line."""
import pytest
import torch
import torch.fx as fx

from vitcc.frontend.capture import capture
from vitcc.errors import VitccError
from vitcc.frontend.input_shapes import input_shape_for

from conftest import tiny_swin, tiny_vit


def test_capture_matches_eager_with_any_batch():
    m = tiny_vit()
    x = torch.randn(input_shape_for(m))
    gm = capture(m, (x,))
    assert type(gm) is not type(m) and isinstance(gm, fx.GraphModule)
    assert all(n.op != "call_module" for n in gm.graph.nodes)  # every module inlined into aten ops
    assert all(str(n.target).startswith("aten.") or n.op != "call_function" or "getitem" in str(n.target)
               for n in gm.graph.nodes)
    assert gm.graph.find_nodes(op="placeholder")[0].meta["tensor_meta"].shape == (1, 3, 32, 32)
    assert gm.meta["source_class"] == "VisionTransformer" and gm.meta["dynamic_batch"]
    assert gm.meta["pretrained_cfg"]["architecture"] == "vit_tiny_patch16_224"
    for batch in (1, 3):
        xb = torch.randn(batch, 3, 32, 32)
        torch.testing.assert_close(gm(xb), m(xb))
    gm.train()  # a plain GraphModule: trains and evaluates like any module
    gm.eval()
    assert {k for k, _ in gm.named_parameters()} == {k for k, _ in m.named_parameters()}


def test_capture_swin_inlines_helpers():
    m = tiny_swin()
    x = torch.randn(1, 3, 56, 56)
    gm = capture(m, (x,))
    torch.testing.assert_close(gm(x), m(x), atol=1e-5, rtol=1e-5)


def test_capture_keeps_output_structure():
    class Two(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.proj(x)
            return {"logits": y, "aux": (y.relu(),)}

    m, x = Two().eval(), torch.randn(1, 4)
    out = capture(m, (x,))(x)
    assert set(out) == {"logits", "aux"} and torch.equal(out["aux"][0], m(x)["aux"][0])


class Gate(torch.nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: not capturable
            return x * 2
        return x


def test_capture_failure_is_one_line():
    m, x = Gate().eval(), torch.randn(2, 4)
    with pytest.raises(VitccError, match=r"torch.export cannot capture Gate: .*data-dependent") as e:
        capture(m, (x,))
    assert "\n" not in str(e.value)


def _records(gm):
    def key(tm):
        if tm is None or hasattr(tm, "shape"):
            return tm and (tuple(tm.shape), tm.dtype)
        return type(tm), tuple(key(t) for t in tm)
    return {n.name: key(n.meta.get("tensor_meta")) for n in gm.graph.nodes}


@pytest.mark.parametrize("model, x", [(tiny_vit, (1, 3, 32, 32)), (tiny_swin, (1, 3, 56, 56)),
                                      (lambda: torch.nn.MultiheadAttention(16, 2).eval(), (5, 1, 16))])
def test_shapes_from_export_records_are_those_a_run_records(model, x):
    from vitcc.frontend.capture import propagate_shapes, shapes_from_export
    m, x = model(), torch.randn(x)
    args = (x, x, x) if isinstance(m, torch.nn.MultiheadAttention) else (x,)
    gm = capture(m, args)  # shapes from torch.export's records, evaluated at the example batch
    recorded = _records(gm)
    assert shapes_from_export(gm, args)
    for n in gm.graph.nodes:
        n.meta.pop("tensor_meta", None)
    propagate_shapes(gm, args)
    assert _records(gm) == recorded and gm.meta["macs"] > 0


def test_shapes_from_export_refuses_a_graph_without_records():
    from vitcc.frontend.capture import shapes_from_export
    gm = capture(tiny_vit(), (torch.randn(1, 3, 32, 32),))
    next(n for n in gm.graph.nodes if n.op == "call_function").meta.pop("val")
    before = _records(gm)
    assert not shapes_from_export(gm, (torch.randn(1, 3, 32, 32),)) and _records(gm) == before


def test_capture_reads_parameters_not_a_cache_a_forward_filled():
    """EfficientViT-MSRA caches its attention-bias table on the first eval forward: capture must not run one
    first, or the graph bakes the table in as a constant and its parameter goes dead (and is never trained)."""
    timm = pytest.importorskip("timm")
    import warnings
    m = timm.create_model("efficientvit_m0", pretrained=False).eval()
    x = torch.randn(1, 3, 224, 224)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.export's note that the cache attribute was assigned during export
        gm = capture(m, (x,))
    attrs = [str(n.target) for n in gm.graph.nodes if n.op == "get_attr"]
    assert sum(a.endswith("attn.attention_biases") for a in attrs) == 6
    assert not any("attention_bias_cache" in a for a in attrs)
    assert all(not a.attention_bias_cache for a in m.modules() if hasattr(a, "attention_bias_cache"))
    torch.testing.assert_close(gm(x), m(x))


class _FxOf211:
    """torch.fx as torch's own tracer reads it in a torch without the switch (2.11): traces on, by default."""
    config = type("config", (), {"do_not_emit_stack_traces": False})

    def __getattr__(self, name):
        return getattr(torch.fx, name)


def test_capture_works_on_a_torch_without_the_stack_trace_switch(monkeypatch):
    """torch 2.11 has no torch.fx.config.do_not_emit_stack_traces: capture records traces there, and compiles.
    This torch's tracer reads the switch itself, so the tracer is given its default while the switch goes."""
    import vitcc
    from torch.fx.experimental import proxy_tensor
    monkeypatch.setattr(proxy_tensor, "fx", _FxOf211())
    monkeypatch.delattr(torch.fx.config, "do_not_emit_stack_traces", raising=False)  # 2.11 has none to remove
    m, x = tiny_vit(), torch.randn(1, 3, 32, 32)
    gm = capture(m, (x,))
    torch.testing.assert_close(gm(x), m(x))
    r = vitcc.compile(m, "magnitude", sparsity=0.5, example_inputs=(x,))  # verifies
    assert r.report["max_rel_error"] < 1e-4 and r.report["params_after"] < r.report["params_before"]
    assert not hasattr(torch.fx.config, "do_not_emit_stack_traces")  # nothing was set that torch lacks


def test_options_a_torch_lacks_are_left_to_its_defaults():
    from vitcc.deploy.export import accepted

    def export_2_5(model, args, f, *, dynamo=False, opset_version=None, verbose=None):  # no external_data
        return None

    asked = dict(dynamo=True, external_data=False, opset_version=18, verbose=False)
    assert accepted(export_2_5, asked) == {"dynamo": True, "opset_version": 18, "verbose": False}
    assert accepted(torch.onnx.export, asked) == asked  # this torch takes all of them


def _allocate_too_much(x):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity "
                                 "of 79.19 GiB of which 1.20 GiB is free.")


def test_running_out_of_memory_while_recording_shapes_stays_out_of_memory():
    """Not 'cannot run the model' (which the pass manager drops for a graph that verify will report): the CLI's
    memory hint must see it, to say what to lower."""
    from vitcc.devices import memory_hint
    from vitcc.frontend.capture import propagate_shapes
    graph = fx.Graph()
    graph.output(graph.call_function(_allocate_too_much, (graph.placeholder("x"),)))
    gm = fx.GraphModule(torch.nn.Module(), graph)
    with pytest.raises(torch.OutOfMemoryError):
        propagate_shapes(gm, (torch.randn(2, 3),))
    with pytest.raises(VitccError, match=r"out of memory on cuda:0.*; lower --batch"), memory_hint("--batch"):
        propagate_shapes(gm, (torch.randn(2, 3),))
