from vitcc.pipeline.manager import make_pass

from conftest import analyzed


def test_random_scores_depend_on_the_seed_only():
    p = analyzed()
    make_pass("random", {"seed": 3}).run(p)
    a = {k: v.clone() for k, v in p.scores.items()}
    make_pass("random", {"seed": 3}).run(p)
    assert all((a[k] == p.scores[k]).all() for k in a)
    make_pass("random", {"seed": 4}).run(p)
    assert any((a[k] != p.scores[k]).any() for k in a)
