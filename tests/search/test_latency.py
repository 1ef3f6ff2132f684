"""`--target latency` without a table (vitcc.profiling.table_for: one measured where the model is, then kept in
the cache), the search against a table, the timers, and aligned/folded compiles staying verified.

How well tables predict belongs to benchmarks/latency_prediction.py; these tests check what is measured when, the
cache, and the selection logic on tiny models (hand-made tables where a test needs particular costs).
"""
import copy
import json
import re

import numpy as np
import pytest
import torch

import vitcc
from vitcc import Insertion, Pass, PassResult, profiling
from vitcc.cli import run
from vitcc.deploy.timing import time_fn, time_ratio, with_batch
from vitcc.errors import VitccError
from vitcc.frontend.capture import capture
from vitcc.pipeline.manager import make_pass
from vitcc.profiling import cache_dir, profile_captured, table_for

from conftest import analyzed, hand_made, image, tiny_vit

PRUNE = "residual,heads,mlp,branch"


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


# -- --target latency without a table: measured once where the model is, then read from the cache -----------

def test_target_latency_without_a_table_profiles_one_and_the_next_compile_reads_it(one_thread, monkeypatch):
    model, x, steps = tiny_vit(), image(batch=1), []
    r = vitcc.compile(model, "magnitude", sparsity=0.2, target="latency", threads=1, prune=PRUNE,
                      example_inputs=(x,), on_progress=steps.append)
    n = len(steps)  # each step says its place and, from the second on, the time left at the pace so far
    assert steps[0] == f"dense model (1/{n})"
    assert all(re.fullmatch(rf".+ \({k}/{n}, ~\d+ (s|min) left\)", s) for k, s in enumerate(steps[1:], 2))
    assert any(s.startswith("all widths 1/3 (") for s in steps) and " removed (" in steps[-1]
    lm = r.report["latency_model"]
    (cached,) = cache_dir().glob("*.json")
    assert lm["table"] == f"profiled on cpu now (eager, fp32, batch 1, 1 thread(s)), cached in {cached}"
    assert lm["measured"]["threads"] == 1 and lm["measured"]["batch"] == 1 and lm["measured"]["mode"] == "eager"
    assert lm["predicted_reduction"] >= 0.2 - 1e-9 and r.report["max_abs_error"] < 1e-4
    monkeypatch.setattr(profiling, "profile_captured", lambda *a, **k: pytest.fail("measured again"))
    again = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.2, target="latency", threads=1, prune=PRUNE,
                          example_inputs=(x,), on_progress=pytest.fail)
    assert again.report["latency_model"]["table"] == (f"profiled on cpu (eager, fp32, batch 1, 1 thread(s)), from "
                                                      f"the cache {cached}")
    assert again.report["widths"] == r.report["widths"] and again.report["max_abs_error"] < 1e-4


@pytest.fixture(scope="module")
def small_table():
    x = image(batch=1)
    return profile_captured(capture(tiny_vit(), (x,)), (x,), threads=1, points=2, samples=3)


def test_the_cache_holds_one_table_per_graph_input_and_timing_setting(small_table, monkeypatch):
    """A table is measured again for another graph, batch, thread count or allocator, and where the cached file is
    not a table: the cache only saves time."""
    calls = []
    monkeypatch.setattr(profiling, "profile_captured", lambda *a, **k: calls.append(k) or copy.deepcopy(small_table))
    x = image(batch=1)
    gm = capture(tiny_vit(), (x,))
    measured = lambda: len(calls)
    table_for(gm, (x,), threads=1)
    table_for(capture(tiny_vit(), (x,)), (x,), threads=1)  # the same model captured again
    assert measured() == 1 and calls[0]["points"] == profiling.ON_DEMAND_POINTS
    table_for(gm, (x,), threads=2)
    table_for(gm, (image(batch=2),), threads=1)
    table_for(capture(tiny_vit(depth=3), (x,)), (x,), threads=1)
    assert measured() == 4
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")  # the user's own malloc settings time differently
    table_for(gm, (x,), threads=1)
    assert measured() == 5 and len(list(cache_dir().glob("*.json"))) == 5
    for f in cache_dir().glob("*.json"):
        f.write_text("not json")
    _, where = table_for(gm, (x,), threads=1)
    assert measured() == 6 and "now" in where


def test_an_unwritable_cache_costs_a_measurement_not_the_compile(small_table, monkeypatch, unwritable_dir):
    monkeypatch.setenv("VITCC_CACHE", str(unwritable_dir / "cache"))
    monkeypatch.setattr(profiling, "profile_captured", lambda *a, **k: copy.deepcopy(small_table))
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.2, target="latency", threads=1, prune=PRUNE,
                      example_inputs=(image(batch=1),))
    assert "not cached" in r.report["latency_model"]["table"] and r.report["max_abs_error"] < 1e-4


def test_select_without_a_table_says_where_one_comes_from():
    p = analyzed(x=image(batch=1), sparsity=0.3, target="latency")
    with pytest.raises(VitccError, match="needs a latency table"):
        make_pass("select").run(p)


def test_target_latency_out_of_reach_is_an_error():
    model, x = tiny_vit(), image(batch=1)
    table = hand_made(analyzed(model, x), 0.1, 0.1)
    table["rest_ms"] += 1e6  # what no width shrinks
    table["dense_ms"] += 1e6
    with pytest.raises(VitccError, match="out of reach"):
        vitcc.compile(model, "magnitude", sparsity=0.5, target="latency", latency_table=table,
                      example_inputs=(x,))


def test_target_latency_removes_branches_where_the_table_says_they_are_dear():
    model, x = tiny_vit(), image(batch=1)
    r = vitcc.compile(model, "magnitude", sparsity=0.3, prune="branch", target="latency",
                      latency_table=hand_made(analyzed(model, x), 0.1, 0.1), example_inputs=(x,))
    assert r.report["removed_branches"] and r.report["latency_model"]["predicted_reduction"] >= 0.3
    assert r.report["max_abs_error"] < 1e-4


# -- the CLI: profile fills the cache that compile reads -------------------------------------------------------

SHAPE = ["--input-shape", "1,3,32,32"]


def test_profile_fills_the_cache_that_compile_reads(tmp_path, model_file, capsys, monkeypatch):
    out = tmp_path / "profile.json"
    code = run(["profile", str(model_file), "--grid", "0.25,0.5", "--threads", "1", "--check", "--rounds", "2",
                "--json", str(out), *SHAPE])
    assert code == 0
    shown = capsys.readouterr().out
    assert "predicted" in shown and "meas. kept" in shown and "cached in" in shown
    data = json.loads(out.read_text())
    assert [r["fraction"] for r in data["rows"]] == [0.25, 0.5]
    # a table of a 1 ms model is mostly timer noise, so only the shape of the rows is asserted here
    assert all(r["macs_kept"] < 1 and r["predicted_ms"] > 0 and r["measured_ms"] > 0 for r in data["rows"])
    assert data["measured"]["threads"] == 1 and str(cache_dir()) in data["table"]
    monkeypatch.setattr(profiling, "profile_captured", lambda *a, **k: pytest.fail("measured again"))
    assert run(["profile", str(model_file), "--grid", "0.5", "--threads", "1", "--json", str(out), *SHAPE]) == 0
    assert "from the cache" in json.loads(out.read_text())["table"]
    rep = tmp_path / "r.json"
    assert run(["compile", str(model_file), "--target", "latency", "--sparsity", "0.2", "--prune", PRUNE,
                "--threads", "1", "--report", str(rep), "-o", str(tmp_path / "s.pt2"), *SHAPE]) == 0
    assert "from the cache" in json.loads(rep.read_text())["latency_model"]["table"]


@pytest.mark.parametrize("flag", [["--mode", "compile"], ["--dtype", "bf16"], ["--batch", "8"], ["--points", "4"],
                                  ["--repeats", "1"]])
def test_profile_options_of_a_written_table_need_o(model_file, capsys, flag):
    assert run(["profile", str(model_file), *SHAPE, *flag]) == 2
    err = capsys.readouterr().err
    assert f"{flag[0]} applies to a table written with -o" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 0, "target": "latency"}, "a whole number >= 1"),
    ({"threads": 1.5, "target": "latency"}, "a whole number >= 1"),
    ({"threads": 2, "target": "macs"}, "applies to target='latency' only"),
])
def test_threads_are_a_positive_count_for_target_latency(kwargs, message):
    with pytest.raises(VitccError, match=message):
        vitcc.compile(tiny_vit(), "magnitude", sparsity=0.3, example_inputs=(image(batch=1),), **kwargs)


# -- timers ---------------------------------------------------------------------------------------------------

def test_timers_return_positive_medians():
    x, w = torch.randn(8, 16), torch.randn(16, 16)
    f = lambda: torch.nn.functional.linear(x, w)
    assert time_fn(f, samples=3) > 0 and time_fn(f, samples=3, clock="thread") >= 0
    r = time_ratio(f, f, samples=5, clock="thread")  # CPU time: robust to a busy machine
    assert 0.2 < r < 5


def test_with_batch_resizes_inputs():
    (x,) = with_batch((image(batch=1),), 4)
    assert x.shape == (4, 3, 32, 32)
