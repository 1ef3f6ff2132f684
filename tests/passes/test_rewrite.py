from dataclasses import replace

import torch

import vitcc

from conftest import image, tiny_vit

SDPA = torch.ops.aten.scaled_dot_product_attention.default


def test_parameters_are_sliced_trainable_and_attributes_follow():
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.5, example_inputs=(image(),))
    m = r.module
    qkv = m.get_submodule("blocks.0.attn.qkv")
    assert isinstance(qkv.weight, torch.nn.Parameter) and qkv.weight.requires_grad
    assert qkv.weight.shape[1] == qkv.weight.shape[1] == 24
    assert m.get_submodule("blocks.0.mlp.fc1").weight.shape[0] == 96
    loss = m(image()).sum()
    loss.backward()
    assert qkv.weight.grad is not None and qkv.weight.grad.shape == qkv.weight.shape


def test_head_dim_pruning_keeps_the_original_attention_scale():
    r = vitcc.compile(tiny_vit(fused=True), "magnitude", sparsity=0.5, prune="head_dim", example_inputs=(image(),))
    sdpa = [n for n in r.module.graph.nodes if n.target is SDPA]
    assert sdpa and all(abs(n.kwargs["scale"] - 16 ** -0.5) < 1e-9 for n in sdpa)
    assert r.report["max_abs_error"] < 1e-5


def test_attention_without_heads_leaves_no_attention_kernel_behind():
    """torch 2.11's CPU SDPA kernel divides by the head count: with every head of block 1 removed, the rewritten
    graph has no SDPA at zero heads (two matmuls give the empty output its shape), and fold and dce remove the
    branch, so the compact graph runs one attention."""
    after_rewrite = []

    class Count(vitcc.Pass):
        def run(self, program):
            after_rewrite.append(sum(n.target is SDPA for n in program.gm.graph.nodes))
            return vitcc.PassResult(modified=False)

    r = vitcc.compile(tiny_vit(fused=True), "magnitude", keep={"blocks.1.attn.heads": []}, example_inputs=(image(),),
                      insert=[vitcc.Insertion(Count(), after="rewrite")])
    assert after_rewrite == [1]
    assert sum(n.target is SDPA for n in r.module.graph.nodes) == 1
    assert not any(n.target is torch.ops.aten.matmul.default for n in r.module.graph.nodes)


def test_result_needs_no_vitcc_code(tmp_path):
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, example_inputs=(image(),))
    code = r.module.code
    assert "vitcc" not in code
    path = tmp_path / "m.pt2"  # another suffix is refused (tests/test_export.py)
    vitcc.save(r.module, path)
    again = torch.export.load(str(path)).module()
    torch.testing.assert_close(again(image()), r.module(image()))
    torch.testing.assert_close(vitcc.load(path)(image()), r.module(image()))


def test_the_users_model_is_left_untouched():
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    vitcc.compile(model, "magnitude", sparsity=0.5, example_inputs=(image(),))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_failing_rewrite_entry_keeps_its_groups_whole_and_the_rest_still_prunes():
    """Never crash on what could be partly pruned: the node's groups stay whole, named in the report."""
    def broken(node, ctx):
        raise ValueError("planted bug")

    table = vitcc.default_table()
    ln = torch.ops.aten.layer_norm
    table.entries[ln] = replace(table.entries[ln], rewrite=broken)

    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.5, example_inputs=(image(),), rules=table)
    failed = [f for f in r.report["frozen"] if "rewrite failed (ValueError: planted bug)" in f["reason"]]
    assert failed and all(f["op"] == "aten.layer_norm.default" for f in failed)
    widths = r.report["widths"]
    assert widths["residual"]["after"] == widths["residual"]["before"]  # what the norms touch stays whole
    assert widths["mlp"]["after"] < widths["mlp"]["before"]
    assert r.report["max_rel_error"] < 1e-5
