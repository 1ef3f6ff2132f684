"""Latency model (vitcc.search.latency), `--target latency`, and aligned/folded compiles staying verified.

Timings themselves belong to benchmarks/latency.py; these tests check structure, caching and selection
logic on tiny models (a few use a deterministic stand-in for the measured op times).
"""
import json
import re

import numpy as np
import pytest
import torch

import vitcc
from vitcc import Insertion, Pass, PassResult
from vitcc.errors import VitccError
from vitcc.search.latency import LatencyModel, LatencyTable, cache_dir, compact_ops, machine_info, machine_key
from vitcc.deploy.timing import time_fn, time_ratio, with_batch

from conftest import analyzed, image, tiny_vit


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITCC_CACHE", str(tmp_path / "cache"))


def by_root(p, keep):
    from vitcc.ir.spaces import find
    return {find(p.group(n).space).id: np.asarray(v) for n, v in keep.items()}


def fake_ms(key: str) -> float:
    """A deterministic stand-in for a measured op: proportional to the elements it touches / multiplies."""
    kind, *parts = key.split("|")
    dims = [[int(d) for d in p.split("x")] for p in parts if re.fullmatch(r"\d+(x\d+)*", p)]
    if kind == "linear":
        lead, k, n = dims[0], dims[1][0], dims[2][0]
        return float(np.prod(lead)) * k * n * 1e-6
    if kind == "sdpa":
        q, kk = dims[0], dims[1]
        return float(np.prod(q[:-1])) * kk[-2] * (q[-1] + dims[2][-1]) * 1e-6
    return float(np.prod(dims[0])) * 1e-7 if dims else 1e-4


@pytest.fixture
def fake_timings(monkeypatch, tmp_path):
    """MAC-proportional stand-in timings, in a cache of their own: a shared cache would hand back real
    measurements (or fake ones rescaled to today's reference GEMM) for the same keys."""
    monkeypatch.setenv("VITCC_CACHE", str(tmp_path))

    def op_ms(self, op):
        if op.key not in self.table:
            self.table.set(op.key, fake_ms(op.key))
            self.table.measured += 1
        return self.table.get(op.key)
    monkeypatch.setattr(LatencyModel, "op_ms", op_ms)
    monkeypatch.setattr(LatencyModel, "dense_measured_ms", lambda self: self.ops_ms({}) + 0.01)
    monkeypatch.setattr(LatencyModel, "dispatch_ms", lambda self: 1e-5)  # not the machine's real view call


# -- alignment and fold keep verified equivalence ----------------------------------------------------

@pytest.mark.parametrize("target, sparsity, align", [("channels", 0.3, 8), ("macs", 0.5, 8), ("params", 0.6, 4)])
def test_aligned_compile_is_verified_and_aligned(target, sparsity, align):
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=sparsity, target=target, align=align,
                      example_inputs=(image(),))
    assert r.report["max_abs_error"] < 1e-4
    for g in r.groups:
        kept = len(r.selection.get(g.name, range(g.size)))
        if g.kind in ("residual", "head_dim", "mlp") and g.size >= align:
            assert kept % align == 0, (g.name, kept)
    x = image(batch=3, seed=7)
    assert r.module(x).shape == (3, 10)


def test_python_default_align_is_one():
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, example_inputs=(image(),))
    assert len(r.selection["residual"]) == 48 - int(0.3 * 48)  # 34: not a multiple of anything


class EmptyBranch(Pass):
    name = "empty-branch"

    def run(self, program):
        program.keep["blocks.0.mlp.hidden"] = np.array([], dtype=np.int64)
        return PassResult()


def test_fold_after_an_aligned_selection_stays_verified():
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, align=8, example_inputs=(image(),),
                      insert=[Insertion(EmptyBranch(), after="select")])
    names = [n for n, _ in r.module.named_parameters()]
    assert not any(n.startswith(("blocks.0.mlp.fc1.", "blocks.0.mlp.fc2.weight")) for n in names)
    assert next(p for p in r.report["passes"] if p["name"] == "fold")["modified"]
    assert r.report["max_abs_error"] < 1e-4
    assert len(r.selection["residual"]) % 8 == 0


# -- the latency model's cache -----------------------------------------------------------------------

def test_cache_dir_follows_env(tmp_path):
    assert cache_dir() == tmp_path / "cache" / "latency"


def test_table_round_trips_and_merges(tmp_path):
    info = machine_info(threads=1)
    t = LatencyTable(info)
    t.set("linear|1x8|16|32|1", 0.5)
    path = t.save()
    assert path.parent == cache_dir() and path.name == f"{machine_key(info)}.json"
    other = LatencyTable(info)  # another process adds an entry
    other.set("sdpa|1x2x4x8|1x2x4x8|1x2x4x8|-|0", 0.25)
    other.save()
    back = LatencyTable.load(info)
    assert back.entries == {"linear|1x8|16|32|1": 0.5, "sdpa|1x2x4x8|1x2x4x8|1x2x4x8|-|0": 0.25}
    assert not back.dirty


def test_table_ignores_other_machines_and_bad_files(tmp_path):
    info = machine_info(threads=1)
    t = LatencyTable(info)
    t.set("k", 1.0)
    t.save()
    other = {**info, "cpu": "some other CPU"}
    assert machine_key(other) != machine_key(info)
    assert LatencyTable.load(other, path=t.path).entries == {}  # same file, different machine: ignored
    t.path.write_text("not json")
    assert LatencyTable.load(info).entries == {}
    assert machine_info(threads=2)["threads"] == 2 and machine_key(machine_info(threads=2)) != machine_key(info)


def test_model_warm_cache_measures_nothing_and_predicts_the_same(fake_timings):
    p = analyzed(x=image(batch=1))
    keep = by_root(p, {"residual": range(24), "blocks.0.mlp.hidden": range(96)})
    first = LatencyModel(p, samples=3)
    a, d = first.predict(keep), first.predict({})
    assert first.table.measured > 0 and first.save() is not None
    second = LatencyModel(analyzed(x=image(batch=1)), samples=3)
    keep2 = by_root(second.program, {"residual": range(24), "blocks.0.mlp.hidden": range(96)})
    assert second.predict(keep2) == pytest.approx(a) and second.predict({}) == pytest.approx(d)
    assert second.table.measured == 0
    data = json.loads(second.table.path.read_text())
    assert data["info"] == machine_info() and len(data["entries"]) == len(second.table)


def test_compact_ops_follow_the_selection():
    p = analyzed(x=image(batch=1))
    dense = {op.key for op in compact_ops(p, {})}
    assert "linear|1x17|48|144|1" in dense  # qkv of block 0: 16 tokens + cls, 48 -> 3 * 48
    assert "linear|1x17|48|192|1" in dense and "linear|1x17|192|48|1" in dense
    assert any(k.startswith("sdpa|1x3x17x16|") for k in dense)
    keep = by_root(p, {"residual": range(24), "blocks.0.mlp.hidden": range(32), "blocks.0.attn.heads": [0],
                       "blocks.1.mlp.hidden": []})
    small = {op.key for op in compact_ops(p, keep)}
    assert "linear|1x17|24|32|1" in small and "linear|1x17|32|24|1" in small
    assert not any("|0|" in k for k in small if k.startswith("linear"))  # emptied mlp of block 1: folded
    assert any(k.startswith("sdpa|1x1x17x16|") for k in small)
    paired = {op.key: op.dense.key for op in compact_ops(p, keep) if op.dense is not None}
    assert paired["linear|1x17|24|32|1"] == "linear|1x17|48|192|1"  # timed beside its dense self
    assert all(op.dense is None for op in compact_ops(p, {}))


def test_timers_return_positive_medians():
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    f = lambda: torch.nn.functional.linear(x, w)
    assert time_fn(f, samples=3) > 0 and time_fn(f, samples=3, clock="thread") >= 0
    r = time_ratio(f, f, samples=5, clock="thread")  # CPU time: robust to a busy machine
    assert 0.2 < r < 5


def test_with_batch_resizes_inputs():
    (x,) = with_batch((image(batch=1),), 4)
    assert x.shape == (4, 3, 32, 32)


# -- --target latency ----------------------------------------------------------------------------------

def test_target_latency_reaches_the_predicted_goal(fake_timings):
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.4, target="latency", example_inputs=(image(batch=1),))
    lm = r.report["latency_model"]
    assert lm["predicted_reduction"] >= 0.4
    assert lm["predicted_reduction"] < 0.55  # the smallest uniform fraction that gets there, not "prune all"
    assert r.report["max_abs_error"] < 1e-4
    assert r.report["macs_after"] < r.report["macs_before"]
    assert lm["cache"].startswith(str(cache_dir()))


def test_target_latency_matches_macs_when_time_is_proportional_to_macs(fake_timings):
    # the stand-in timings are MAC-proportional for linears and attention and ~free otherwise, so removing
    # 40% of the latency removes about 40% of the MACs; the widths may differ, since the latency search also
    # tries each kind further than the rest and keeps the candidate that loses least
    lat = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.4, target="latency", example_inputs=(image(batch=1),))
    macs = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.4, target="macs", example_inputs=(image(batch=1),))
    assert lat.report["macs_after"] == pytest.approx(macs.report["macs_after"], rel=0.05)
    assert "least loss" in lat.report["latency_model"]["selection"]
    assert lat.report["max_abs_error"] < 1e-4


def test_target_latency_does_not_overshoot_on_a_head_step(fake_timings, monkeypatch):
    # attention made expensive: one head fewer per block (3 -> 2) removes far more than 40%, so the
    # uniform search overshoots; a refined candidate keeps 3 heads and prunes the other kinds further
    heavy = lambda key, orig=fake_ms: orig(key) * (40 if key.startswith("sdpa") else 1)
    monkeypatch.setattr(__import__("test_latency"), "fake_ms", heavy)
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.4, target="latency", example_inputs=(image(batch=1),))
    lm = r.report["latency_model"]
    assert "searched again" in lm["selection"] and not lm["selection"].startswith("uniform")
    assert r.report["widths"]["heads"]["after"] == 6
    assert 0.4 <= lm["predicted_reduction"] < 0.5
    assert r.report["max_abs_error"] < 1e-4


def test_target_latency_with_branches_counts_what_removed_branches_take_away(fake_timings):
    from vitcc.ir.selection import KeptByRoot
    p = analyzed(x=image(batch=1))
    model = LatencyModel(p)
    gone = KeptByRoot({}, {"blocks.1.attn"})
    timed = len(compact_ops(p, {}))
    assert len(compact_ops(p, gone)) == timed - 6  # its norm, qkv, attention, projection, dropout and add
    calls = sum(n.op == "call_function" for n in p.gm.graph.nodes)
    views = 8  # and its share of what is not timed op by op: reshape, permute, unbind, 3 getitems, transpose, reshape
    share = 1 - views / (calls - timed)
    assert model.predict(gone) == pytest.approx(model.ops_ms(gone) + model.overhead_ms * share)
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, prune="heads,mlp,branch", target="latency",
                      example_inputs=(image(batch=1),))
    lm = r.report["latency_model"]
    assert "branches removed" in lm["selection"] and 0.3 <= lm["predicted_reduction"] < 0.32
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, prune="branch", target="latency",
                      example_inputs=(image(batch=1),))
    assert r.report["removed_branches"] and 0.3 <= r.report["latency_model"]["predicted_reduction"]


def test_target_latency_out_of_reach_is_an_error(fake_timings, monkeypatch):
    monkeypatch.setattr(LatencyModel, "dense_measured_ms", lambda self: self.ops_ms({}) + 1e6)
    with pytest.raises(VitccError, match="out of reach"):
        vitcc.compile(tiny_vit(), "magnitude", sparsity=0.5, target="latency", example_inputs=(image(batch=1),))


def test_target_latency_measured_for_real_on_a_tiny_model(one_thread):
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.02, target="latency", example_inputs=(image(batch=1),))
    lm = r.report["latency_model"]
    assert lm["predicted_reduction"] >= 0.02 and lm["ops_measured"] > 0
    assert r.report["params_after"] < r.report["params_before"]
    assert r.report["max_abs_error"] < 1e-4
    assert (cache_dir() / f"{machine_key(machine_info())}.json").exists()
    again = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.02, target="latency", example_inputs=(image(batch=1),))
    assert again.report["latency_model"]["ops_measured"] == 0  # served from the cache, dense model included
    assert again.report["latency_model"]["predicted_ms_before"] == pytest.approx(lm["predicted_ms_before"])
    assert again.report["widths"] == r.report["widths"]


def test_cli_compile_target_latency(tmp_path, capsys, monkeypatch, fake_timings):
    from vitcc.cli import run
    path = tmp_path / "m.pt"
    torch.save(tiny_vit(), path)
    rep = tmp_path / "r.json"
    code = run(["compile", str(path), "--target", "latency", "--sparsity", "0.3", "--input-shape", "1,3,32,32",
                "--report", str(rep)])
    assert code == 0
    assert json.loads(rep.read_text())["latency_model"]["predicted_reduction"] >= 0.3


# -- thread counts: the latency model is measured, and cached, per count -----------------------------------

def _cache_files():
    return {json.loads(p.read_text())["info"]["threads"] for p in cache_dir().glob("*.json")}


def test_target_latency_times_ops_at_the_given_thread_count_cached_per_count(fake_timings):
    before = torch.get_num_threads()
    two = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, target="latency", threads=2,
                        example_inputs=(image(batch=1),))
    assert two.report["latency_model"]["threads"] == 2 and torch.get_num_threads() == before
    assert _cache_files() == {2}
    one = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, target="latency", threads=1,
                        example_inputs=(image(batch=1),))
    assert one.report["latency_model"]["threads"] == 1 and one.report["latency_model"]["ops_measured"] > 0
    assert _cache_files() == {1, 2}  # the second count measured its own ops into its own file
    again = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, target="latency", threads=2,
                          example_inputs=(image(batch=1),))
    assert again.report["latency_model"]["ops_measured"] == 0 and torch.get_num_threads() == before


def test_profile_fills_the_cache_of_its_thread_count(fake_timings):
    from vitcc.cli.profile import profile_model
    before = torch.get_num_threads()
    res = profile_model(tiny_vit(), (image(batch=1),), grid=[0.5], threads=2)
    assert res["machine"]["threads"] == 2 and _cache_files() == {2} and torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 0, "target": "latency"}, "a whole number >= 1"),
    ({"threads": 1.5, "target": "latency"}, "a whole number >= 1"),
    ({"threads": 2, "target": "macs"}, "applies to target='latency' only"),
])
def test_threads_are_a_positive_count_for_target_latency(kwargs, message):
    with pytest.raises(VitccError, match=message):
        vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, example_inputs=(image(batch=1),), **kwargs)
