"""Latency tables that travel (vitcc.search.latency_table, vitcc.profiling): written by `vitcc profile -o`, read
in another process by `compile --latency-table`, selection from a hand-made table, prediction against measurement,
and the one-line errors. Tiny models on the CPU; the CUDA test skips without CUDA."""
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import vitcc
from vitcc.cli import run
from vitcc.errors import VitccError
from vitcc.frontend.capture import capture
from vitcc.profiling import profile_table, read_table, write_table
from vitcc.search.latency_table import FORMAT, TableCost, interp, lanes, rest_slope, unit_floor, unit_time

from conftest import analyzed, hand_made, image, tiny_vit

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAPE = ["--input-shape", "1,3,32,32"]
HEADER = ("device", "device_name", "torch", "cuda", "dtype", "batch", "mode", "threads", "allocator", "subnormals",
          "date", "vitcc", "model", "fingerprint", "input_shape")


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "model.pt"
    torch.save(tiny_vit(), path)
    return path


@pytest.fixture(scope="module")
def table_file(model_file):
    out = model_file.parent / "t.json"
    code = run(["profile", str(model_file), *SHAPE, "--device", "cpu", "--threads", "1", "--points", "3",
                "--batch", "2", "-o", str(out)])
    assert code == 0
    return out


def test_table_header_and_units(table_file, model_file):
    t = read_table(table_file)
    assert t["format"] == FORMAT
    m = t["measured"]
    assert all(k in m for k in HEADER)
    assert (m["device"], m["dtype"], m["mode"], m["batch"], m["threads"]) == ("cpu", "fp32", "eager", 2, 1)
    assert m["model"] == str(model_file) and m["input_shape"] == [3, 32, 32] and m["vitcc"] == vitcc.__version__
    assert m["repeats"] == 2  # `vitcc profile -o` passes over the grid twice and averages
    # two blocks of one structure: one unit per role, shared by the blocks
    assert len(t["branches"]) == 4 and len(t["units"]) == 2
    assert sorted(u["role"] for u in t["units"].values()) == ["attn", "mlp"]
    for u in t["units"].values():
        assert u["dense_ms"] > 0
        assert len(u["slots"]["residual"]) >= 3  # dense and narrowed residual widths
        # all widths narrowed at once, at a few fractions: [widths per slot, ms, the dense ms beside it]
        assert len(u["joint"]) >= 2 and all(set(w) == set(u["widths"]) and ms > 0 and ref > 0 for w, ms, ref in u["joint"])
        assert all(w["residual"] < u["widths"]["residual"] for w, _, _ in u["joint"])
    assert t["dense_ms"] > 0 and set(t["rest"]) >= {"residual/residual", "mlp/0", "heads/0"}
    # the whole model without a third, two thirds and all of each role's branches (two blocks: one, two)
    assert {"branch/attn", "branch/mlp"} <= set(t["rest"])
    assert all([f for f, _ in t["rest"][f"branch/{role}"]] == [1.0, 0.5, 0.0] for role in ("attn", "mlp"))


def test_a_grid_point_times_only_the_units_its_widths_changed(monkeypatch):
    """A lane narrows one kind: the units it leaves as they are would cost a torch.compile each and measure a ratio
    of 1 plus noise. And a joint point's whole model is not used: it is neither built nor timed."""
    from vitcc import profiling
    built: dict[str, list[str]] = {}
    step = ["dense model"]
    runner = profiling.Timer.runner
    monkeypatch.setattr(profiling.Timer, "runner", lambda self, m, inputs: built.setdefault(step[0], []).append(
        "whole" if len(inputs) == 1 and inputs[0].dim() == 4 else "unit") or runner(self, m, inputs))
    x = image(batch=1)
    profiling.profile_captured(capture(tiny_vit(), (x,)), (x,), threads=1, points=3, samples=3,
                               on_progress=lambda s: step.__setitem__(0, s))
    assert built["dense model"] == ["whole", "unit", "unit"]
    by_lane = lambda lane: [b for s, b in built.items() if s.startswith(lane + " ")]
    assert by_lane("mlp/0") and all(b == ["whole", "unit"] for b in by_lane("mlp/0"))  # not the attention unit
    assert by_lane("heads/0") and all(b == ["whole", "unit"] for b in by_lane("heads/0"))  # not the MLP unit
    assert all(b == ["whole", "unit", "unit"] for b in by_lane("residual/residual"))  # every unit reads it
    assert by_lane("all widths") and all(b == ["unit", "unit"] for b in by_lane("all widths"))


def test_passes_over_the_grid_count_their_steps_together_and_are_averaged(model_file, tmp_path, capsys):
    from vitcc.profiling import profile_table
    steps: list[str] = []
    x = image(batch=1)
    table = profile_table(tiny_vit(), (x,), threads=1, points=2, samples=3, repeats=2, on_progress=steps.append)
    n = len(steps)
    one_pass = n // 2  # the second pass goes on counting where the first stopped, its pace its own
    assert n == 2 * one_pass and steps[0] == f"dense model (1/{n})"
    assert re.fullmatch(rf"dense model \({one_pass + 1}/{n}\)", steps[one_pass]) and f"({n}/{n}, ~" in steps[-1]
    assert table["measured"]["repeats"] == 2 and table["dense_ms"] > 0
    assert run(["profile", str(model_file), *SHAPE, "--repeats", "0", "-o", str(tmp_path / "t.json")]) == 2
    assert "--repeats must be >= 1" in capsys.readouterr().err and not (tmp_path / "t.json").exists()


def test_passes_average_each_slot_as_ratios_to_its_dense_width():
    """Each pass scales a slot's points by the unit's dense time in its own lane, timed at that moment: the ratios
    are what a prediction reads, so those are averaged (not the ms), and the rest's points as they are."""
    from vitcc.profiling import _averaged

    def one_pass(lane_dense: float, half: float, rest: float) -> dict:
        return {"dense_ms": 10.0 + rest, "rest_ms": rest, "rest": {"mlp/0": [[1.0, rest], [0.5, rest - 1.0]]},
                "units": {"u": {"dense_ms": 2.0, "widths": {"0": 8},
                                "slots": {"0": [[8, lane_dense], [4, lane_dense * half]]},
                                "joint": [[{"0": 4}, 1.0 * half, 2.0]]}}}
    table = _averaged([one_pass(2.2, 0.5, 1.0), one_pass(1.8, 0.7, 3.0)])
    unit = table["units"]["u"]
    assert unit["slots"]["0"] == [[8, pytest.approx(2.0)], [4, pytest.approx(2.0 * 0.6)]]
    assert unit["joint"][0][1:] == [pytest.approx(0.6), 2.0]
    assert table["rest"]["mlp/0"] == [[1.0, 2.0], [0.5, 1.0]] and table["rest_ms"] == 2.0 and table["dense_ms"] == 12.0


def test_table_read_back_in_another_process(table_file, model_file, tmp_path):
    rep, out = tmp_path / "r.json", tmp_path / "c.pt2"
    code = ("import sys; from vitcc.cli import run; sys.exit(run(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", code, "compile", str(model_file), *SHAPE, "--target", "latency",
                           "--sparsity", "0.05", "--prune", "residual,heads,head_dim,mlp,branch", "--latency-table",
                           str(table_file), "--report", str(rep), "-o", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "VITCC_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 0, proc.stderr
    assert "verified" in proc.stdout and f"latency table: {table_file}" in proc.stdout.replace("\n", " ")
    lm = json.loads(rep.read_text())["latency_model"]
    assert lm["table"] == str(table_file) and lm["measured"] == read_table(table_file)["measured"]
    # a tiny model on a shared CPU is dispatch-bound: its table says little can go, so the goal is modest
    assert lm["predicted_reduction"] >= 0.05 - 1e-9 and lm["predicted_ms_after"] < lm["predicted_ms_before"]
    assert not (tmp_path / "cache").exists()  # nothing was timed: the table answered
    assert out.exists()


def test_a_prediction_run_keeps_its_table_and_replays_from_it_in_another_process(tmp_path):
    """benchmarks/latency_prediction.py keeps the table beside its results, and `--replay` predicts the recorded
    selections again from it, nothing timed (a GPU's run checked on a CPU): with the same vitcc, the same errors."""
    script, out = [sys.executable, str(ROOT.parent / "benchmarks" / "latency_prediction.py")], tmp_path / "lp"
    run_ = subprocess.run([*script, "--threads", "1", "--model", "deit_tiny_patch16_224", "--depth", "1",
                           "--selections", "2", "--searched", "", "--points", "2", "--repeats", "1", "--rounds", "1",
                           "--out", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run_.returncode == 0, run_.stderr
    assert read_table(out.with_suffix(".table.json"))["measured"]["model"] == "timm:deit_tiny_patch16_224"
    replay = subprocess.run([*script, "--replay", str(out.with_suffix(".json"))], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    assert replay.returncode == 0, replay.stderr
    recorded, now = (re.search(rf"{name} +(median .*)", replay.stdout).group(1) for name in ("recorded", "now"))
    assert recorded == now and "within 5 points" in now
    out.with_suffix(".table.json").unlink()
    missing = subprocess.run([*script, "--replay", str(out.with_suffix(".json"))], capture_output=True, text=True,
                             timeout=300, cwd=ROOT)
    assert missing.returncode == 2 and missing.stdout.count("\n") == 1 and "rerun it" in missing.stdout


def test_selection_follows_the_table():
    """Heads dear, everything else nearly free: the latency search takes heads first; the reverse keeps them."""
    model, x = tiny_vit(depth=2, num_heads=4, embed_dim=64), image(batch=1)
    p = analyzed(model, x)

    def kept_heads(table):
        r = vitcc.compile(model, "magnitude", example_inputs=(x,), target="latency", sparsity=0.3,
                          prune="heads,mlp", latency_table=table)
        assert r.report["latency_model"]["table"] == "the latency table"
        return r.report["widths"]["heads"]["after"] / r.report["widths"]["heads"]["before"], \
            r.report["widths"]["mlp"]["after"] / r.report["widths"]["mlp"]["before"]
    heads, mlp = kept_heads(hand_made(p, heads_ms=1.0, other_ms=0.01))
    assert heads < 1.0 and heads < mlp
    heads2, mlp2 = kept_heads(hand_made(p, heads_ms=0.01, other_ms=1.0))
    assert heads2 > heads and mlp2 < mlp


def test_removed_branch_loses_its_unit():
    model, x = tiny_vit(), image(batch=1)
    p = analyzed(model, x)
    cost = TableCost(p, hand_made(p, 0.1, 0.1))
    from vitcc.ir.selection import KeptByRoot
    dense = cost(KeptByRoot())
    assert cost(KeptByRoot({}, {p.branches[0].name})) == pytest.approx(dense - 1.0)


def test_a_branch_dearer_inside_the_model_than_alone_saves_what_its_lane_says():
    """Removed from the whole, the attention branches together saved 1 ms more than their units alone (caches):
    the rest's line in the attention lane holds it, and removing half of them saves half of it."""
    model, x = tiny_vit(depth=4), image(batch=1)
    p = analyzed(model, x)
    table = hand_made(p, 0.1, 0.1)
    attn = [b.name for b in p.branches if b.role == "attn"]
    table["rest"]["branch/attn"] = [[1.0, 0.1], [0.5, 0.1 - 0.5], [0.0, 0.1 - 1.0]]
    cost = TableCost(p, table)
    from vitcc.ir.selection import KeptByRoot
    dense = cost(KeptByRoot())
    assert cost(KeptByRoot({}, set(attn[:2]))) == pytest.approx(dense - 2 * 1.0 - 0.5)
    mlp = next(b.name for b in p.branches if b.role == "mlp")
    assert cost(KeptByRoot({}, {mlp})) == pytest.approx(dense - 1.0)  # no lane measured for it: its unit alone


def test_units_timed_alone_dearer_than_the_whole_predict_the_whole_minus_their_savings():
    """A CUDA graph at batch 1: each unit timed on its own pays a replay that the whole model pays once, so
    the units add up to more than the whole and the rest is negative. The prediction still starts from the
    measured whole and takes off what the units save; clamping the rest at 0 would overstate every model."""
    model, x = tiny_vit(), image(batch=1)
    p = analyzed(model, x)
    table = hand_made(p, 0.1, 0.1)
    table["dense_ms"], table["rest_ms"] = 0.5 * len(p.branches), -0.5 * len(p.branches)
    cost = TableCost(p, table)
    from vitcc.ir.selection import KeptByRoot
    assert cost.dense() == pytest.approx(table["dense_ms"])
    assert cost(KeptByRoot({}, {p.branches[0].name})) == pytest.approx(table["dense_ms"] - 1.0)


def test_a_fixed_cost_per_unit_is_fitted_and_not_compounded():
    """A unit costing F + W * r1 * r2 (a launch F that no width shrinks): the one-width sweeps alone, multiplied,
    compound F and predict it too fast; the floor fitted to the joint points predicts it exactly."""
    F, W = 2.0, 8.0
    grid = [4, 8, 12, 16]
    unit = {"dense_ms": F + W, "widths": {"a": 16, "b": 16},
            "slots": {k: [[w, F + W * w / 16] for w in grid] for k in ("a", "b")},
            "joint": [[{"a": w, "b": w}, F + W * (w / 16) ** 2, F + W] for w in (12, 8, 4)]}
    truth = F + W * (8 / 16) * (4 / 16)
    widths, dense = {"a": 8, "b": 4}, {"a": 16, "b": 16}
    assert unit_time(unit, widths, dense) == pytest.approx((F + W / 2) * (F + W / 4) / (F + W))  # no floor: 3.6
    floor = unit_floor(unit)
    assert floor == pytest.approx(F, rel=0.05)
    assert unit_time(unit, widths, dense, floor) == pytest.approx(truth, rel=0.02)


def test_timer_ratio_against_a_reference_timed_beside_it():
    from vitcc.profiling import Timer
    timer = Timer(torch.device("cpu"), torch.float32, "eager", samples=5)
    x = torch.randn(256, 256)
    once = timer.runner(torch.nn.Linear(256, 256), [x])
    twice = timer.runner(torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 256)), [x])
    assert 1.4 < timer.ratio(twice, once) < 2.8 and timer.against([], once)[1] > 0


def test_timer_on_a_gpu_reads_events_around_the_runs_alternating(cuda_events_on_the_host_clock):
    import time
    from vitcc.profiling import Timer
    timer = Timer(torch.device("cuda"), torch.float32, "eager", samples=5)
    assert 2.0 < timer.ratio(lambda: time.sleep(0.012), lambda: time.sleep(0.003)) < 5.0  # 4 as slept
    assert 2.9 < timer.against([], lambda: time.sleep(0.003))[1] < 8.0
    (double, half), ref_ms = timer.against([lambda: time.sleep(0.012), lambda: time.sleep(0.003)],
                                           lambda: time.sleep(0.006))
    assert 1.4 < double < 2.5 and 0.4 < half < 0.8 and 5.9 < ref_ms < 12.0
    # runs under a millisecond are looped so that a sample lasts about one
    runs = []
    assert timer.against([], lambda: runs.append(1))[1] < 0.1 and len(runs) > 5 * 50


def test_interp_is_piecewise_linear():
    pts = [[16, 1.0], [32, 1.0], [48, 3.0]]
    assert interp(pts, 40) == pytest.approx(2.0) and interp(pts, 24) == pytest.approx(1.0)
    assert interp(pts, 8) == pytest.approx(1.0) and interp(pts, 64) == pytest.approx(5.0)


def test_rest_is_a_line_through_the_dense_point_not_the_points_joined():
    """The rest is a small difference of two large measurements: one noisy point (a dip at half the width) moves
    the fitted line a little, where joining the points would promise its whole dip to the search."""
    on_a_line = [[1.0, 10.0], [0.75, 9.0], [0.5, 8.0], [0.25, 7.0]]
    assert rest_slope(on_a_line) == pytest.approx(4.0)
    dip = [[1.0, 10.0], [0.75, 9.0], [0.5, 2.0], [0.25, 7.0]]
    assert rest_slope(dip) * (0.5 - 1.0) == pytest.approx(-6.5 / 0.875 / 2)
    assert interp(dip, 0.5) - 10.0 == -8.0
    assert rest_slope([[1.0, 3.0]]) == 0.0


def test_prediction_close_to_measurement():
    """On the CPU (1 thread), the table's predicted cut of a compact tiny ViT against the measured one."""
    from vitcc.deploy.timing import intra_op_threads, time_ratio
    model, x = tiny_vit(embed_dim=96, depth=2, num_heads=3), image(batch=8)
    table = profile_table(model, (x,), threads=1, points=4, samples=5)
    r = vitcc.compile(model, "magnitude", example_inputs=(x,), target="latency", sparsity=0.3, latency_table=table,
                      prune="residual,heads,mlp,branch")
    predicted = r.report["latency_model"]["predicted_ms_after"] / r.report["latency_model"]["predicted_ms_before"]
    with intra_op_threads(1):
        compact, dense = r.module.eval(), model.eval()
        measured = time_ratio(lambda: compact(x), lambda: dense(x), samples=9, clock="thread")
    assert abs(predicted - measured) < 0.3, (predicted, measured)


def test_mismatched_table_is_one_line_and_writes_nothing(table_file, tmp_path, capsys):
    other = tmp_path / "other.pt"
    torch.save(tiny_vit(depth=3), other)
    out = tmp_path / "c.pt2"
    code = run(["compile", str(other), *SHAPE, "--target", "latency", "--sparsity", "0.2", "--latency-table",
                str(table_file), "-o", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("vitcc: error:") and "\n" not in err
    assert "was measured on" in err and "not on this model" in err and not out.exists()
    with pytest.raises(VitccError, match="not on this model") as refused:
        vitcc.compile(tiny_vit(embed_dim=96), "magnitude", example_inputs=(image(batch=1),), target="latency",
                      sparsity=0.2, latency_table=read_table(table_file))
    assert "torch" not in str(refused.value)  # the same release: nothing to say about it


def test_a_table_from_another_torch_release_that_traced_other_ops_says_so(table_file):
    table = read_table(table_file)
    table["measured"].update(torch="2.11.0", fingerprint="0" * 16)  # as if 2.11 had captured other ops
    with pytest.raises(VitccError, match=rf"torch 2\.11\.0\), not on this model .*torch {re.escape(torch.__version__)}\)"
                       r".*under the torch that compiles it") as refused:
        vitcc.compile(tiny_vit(), "magnitude", example_inputs=(image(batch=1),), target="latency", sparsity=0.2,
                      latency_table=table)
    assert "\n" not in str(refused.value)


def test_bad_table_files(tmp_path, model_file, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    assert run(["compile", str(model_file), *SHAPE, "--target", "latency", "--latency-table", str(bad)]) == 2
    assert "is not a vitcc latency table" in capsys.readouterr().err
    assert run(["compile", str(model_file), *SHAPE, "--latency-table", str(bad)]) == 2
    assert "add --target latency" in capsys.readouterr().err
    t = tmp_path / "t.json"
    write_table({"format": FORMAT}, t)
    with pytest.raises(VitccError, match="has no 'measured'"):
        read_table(t)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_refused_without_cuda(model_file, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert run(["profile", str(model_file), *SHAPE, "--device", "cuda", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA" in err and "\n" not in err and not out.exists()
    assert run(["profile", str(model_file), *SHAPE, "--mode", "cudagraph", "-o", str(out)]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not out.exists()


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["eager", "cudagraph"])
def test_cuda_table(mode):
    model, x = tiny_vit(), image(batch=4)
    t = profile_table(model, (x,), device="cuda", dtype="bf16", mode=mode, points=3)
    assert t["measured"]["device"].startswith("cuda") and t["measured"]["mode"] == mode
    r = vitcc.compile(model, "magnitude", example_inputs=(x.cpu(),), target="latency", sparsity=0.2,
                      prune="residual,heads,mlp,branch", latency_table=t)
    assert r.report["latency_model"]["predicted_reduction"] >= 0.2 - 1e-9
    # the model captured on the GPU, as `compile --device cuda` captures it, is the model the table was made of
    r = vitcc.compile(model.cuda(), "magnitude", example_inputs=(x.cuda(),), target="latency", sparsity=0.2,
                      prune="residual,heads,mlp,branch", latency_table=t)
    assert r.report["latency_model"]["predicted_reduction"] >= 0.2 - 1e-9 and r.report["device"].startswith("cuda")


def test_table_of_a_captured_graph_serves_the_model_and_leaves_the_graph_as_it_was():
    """What compile profiles on a GPU: the graph it captured, narrowed at grid widths in working copies."""
    from vitcc.profiling import profile_captured
    model, x = tiny_vit(), image(batch=2)
    gm = capture(model, (x,))
    shapes = {k: tuple(v.shape) for k, v in gm.state_dict().items()}
    table = profile_captured(gm, (x,), threads=1, points=2, samples=3)
    assert {k: tuple(v.shape) for k, v in gm.state_dict().items()} == shapes
    assert all(len(pts) >= 2 for u in table["units"].values() for pts in u["slots"].values() if pts)
    r = vitcc.compile(model, "magnitude", example_inputs=(x,), target="latency", sparsity=0.1, latency_table=table,
                      prune="residual,heads,mlp,branch")
    assert r.report["max_abs_error"] < 1e-4 and r.report["latency_model"]["predicted_reduction"] >= 0.1 - 1e-9


@pytest.mark.cuda
def test_latency_target_on_a_gpu_without_a_table_measures_one_there(tmp_path):
    """A tiny model on a GPU is bound by kernel launches: narrowing saves little there, removing branches saves."""
    model, x = tiny_vit().cuda(), image(batch=4).cuda()
    prune = "residual,heads,mlp,branch"
    r = vitcc.compile(model, "magnitude", example_inputs=(x,), target="latency", sparsity=0.2, prune=prune)
    lm = r.report["latency_model"]
    assert lm["measured"]["device"].startswith("cuda") and lm["measured"]["mode"] == "eager"
    assert lm["table"].startswith("profiled on cuda") and lm["predicted_reduction"] >= 0.2 - 1e-9
    out = tmp_path / "small.pt2"
    assert run(["compile", str(_saved(model.cpu(), tmp_path)), *SHAPE, "--device", "cuda", "--target", "latency",
                "--sparsity", "0.2", "--prune", prune, "-o", str(out)]) == 0 and out.exists()


def _saved(model, tmp_path):
    path = tmp_path / "model.pt"
    torch.save(model, path)
    return path


def test_lanes_tie_fused_head_dims():
    p = analyzed(tiny_vit(), image(batch=1))
    lane = lanes(p)
    assert lane["blocks.0.attn.qk_dim"] == lane["blocks.0.attn.v_dim"]  # one fused qkv reshape
    assert lane["blocks.0.attn.heads"] == lane["blocks.1.attn.heads"] == "heads/0"
