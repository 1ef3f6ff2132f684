"""Independent of vitcc's masked reference: prune channels that are already zero, compare with the ORIGINAL."""
import torch

import vitcc

from conftest import image, tiny_vit


def plant(model):
    """Zero head 1 of block 0, v dims 3 and 7 and qk dims 2 and 9 of block 1, and MLP neurons of block 0."""
    D, C = 16, 48
    with torch.no_grad():
        qkv = model.blocks[0].attn.qkv
        for part in range(3):
            rows = slice(part * C + 1 * D, part * C + 2 * D)
            qkv.weight[rows] = 0
            qkv.bias[rows] = 0
        qkv = model.blocks[1].attn.qkv
        for h in range(3):
            for d in (3, 7):
                qkv.weight[2 * C + h * D + d] = 0
                qkv.bias[2 * C + h * D + d] = 0
            for d in (2, 9):
                for part in (0, 1):
                    qkv.weight[part * C + h * D + d] = 0
                    qkv.bias[part * C + h * D + d] = 0
        fc1 = model.blocks[0].mlp.fc1
        fc1.weight[[5, 17, 100]] = 0
        fc1.bias[[5, 17, 100]] = 0


def test_pruning_planted_zeros_gives_back_the_original_model():
    model = tiny_vit(fused=True)
    plant(model)
    x = image()
    with torch.no_grad():
        want = model(x)
    D = 16
    keep = {
        "blocks.0.attn.heads": [0, 2],
        "blocks.1.attn.v_dim": [d for d in range(D) if d not in (3, 7)],
        "blocks.1.attn.qk_dim": [d for d in range(D) if d not in (2, 9)],
        "blocks.0.mlp.hidden": [j for j in range(192) if j not in (5, 17, 100)],
    }
    r = vitcc.compile(model, "magnitude", keep=keep, example_inputs=(x,))
    with torch.no_grad():
        got = r.module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert r.module.blocks.get_submodule("0.attn.qkv").weight.shape[0] == 2 * 3 * 16
    assert r.module.blocks.get_submodule("1.attn.qkv").weight.shape[0] == 3 * 3 * 14
    assert r.module.blocks.get_submodule("0.mlp.fc1").weight.shape[0] == 189
    assert r.report["params_after"] < r.report["params_before"]


def test_an_attention_block_with_no_heads_left_is_its_projection_bias():
    model = tiny_vit(fused=False)
    with torch.no_grad():
        model.blocks[1].attn.qkv.weight[96:] = 0  # every v row: the block's attention output is proj's bias
        model.blocks[1].attn.qkv.bias[96:] = 0
        want = model(image())
    r = vitcc.compile(model, "magnitude", keep={"blocks.1.attn.heads": []}, example_inputs=(image(),))
    torch.testing.assert_close(r.module(image()), want, rtol=1e-5, atol=1e-5)
    names = [n for n, _ in r.module.named_parameters()]
    assert not any(n.startswith(("blocks.1.attn.qkv.", "blocks.1.attn.proj.weight")) for n in names)
    assert not any(n.target is torch.ops.aten.scaled_dot_product_attention.default and "blocks_1" in str(n.args)
                   for n in r.module.graph.nodes)
