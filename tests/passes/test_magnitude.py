import torch

from vitcc.pipeline.manager import make_pass

from conftest import analyzed, tiny_vit


def test_l1_and_l2_scores_sum_every_member_slice():
    model = tiny_vit()
    p = analyzed(model)
    make_pass("magnitude", {"p": 1}).run(p)
    fc1, fc2 = model.blocks[0].mlp.fc1, model.blocks[0].mlp.fc2
    want = fc1.weight.abs().sum(1) + fc1.bias.abs() + fc2.weight.abs().sum(0)
    torch.testing.assert_close(p.scores["blocks.0.mlp.hidden"], want.detach(), rtol=1e-5, atol=1e-5)
    make_pass("magnitude").run(p)
    want2 = (fc1.weight.pow(2).sum(1) + fc1.bias.pow(2) + fc2.weight.pow(2).sum(0)).sqrt()
    torch.testing.assert_close(p.scores["blocks.0.mlp.hidden"], want2.detach(), rtol=1e-5, atol=1e-5)


def test_head_scores_cover_q_k_v_and_proj():
    model = tiny_vit()
    p = analyzed(model)
    make_pass("magnitude", {"p": 1}).run(p)
    qkv, proj = model.blocks[0].attn.qkv, model.blocks[0].attn.proj
    h, D, C = 1, 16, 48
    rows = [part * C + h * D + d for part in range(3) for d in range(D)]
    want = qkv.weight[rows].abs().sum() + qkv.bias[rows].abs().sum() + proj.weight[:, h * D:(h + 1) * D].abs().sum()
    assert abs(p.scores["blocks.0.attn.heads"][h].item() - want.item()) < 1e-3
