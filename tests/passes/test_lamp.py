
from vitcc.pipeline.manager import make_pass

from conftest import analyzed


def test_lamp_scores_are_normalised_within_each_group_and_ask_for_a_global_threshold():
    p = analyzed()
    make_pass("lamp").run(p)
    for g in p.groups:
        s = p.scores[g.name]
        assert s.max().item() == 1.0  # the largest channel's share of the energy of itself alone
        assert (s > 0).all()
    assert p.options["scope"] == "global"
    make_pass("select", {"sparsity": 0.5}).run(p)
    assert p.keep["residual"].size < 48
