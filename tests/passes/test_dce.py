import vitcc

from conftest import image, tiny_vit


def test_dead_parameters_and_modules_are_removed():
    r = vitcc.compile(tiny_vit(), "magnitude", keep={"blocks.1.attn.heads": []}, example_inputs=(image(),))
    names = [n for n, _ in r.module.named_parameters()]
    assert not any(n.startswith("blocks.1.attn.qkv") for n in names)
    assert r.report["params_after"] == sum(p.numel() for p in r.module.parameters())
    live = {n.target for n in r.module.graph.nodes if n.op == "get_attr"}
    assert set(names) <= live
