"""Hypothesis over `vitcc compile` arguments: whatever mix of good and bad values, the exit code is 0, 2 or 3,
nothing prints a traceback, and a failed run leaves no file behind (outputs are all or none)."""
import os
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from vitcc.cli import run

from conftest import tiny_vit

pytestmark = pytest.mark.usefixtures("one_thread")



def mix(valid, invalid, weight: int = 6):
    """Mostly valid values (so that many examples get as far as compiling and writing), sometimes invalid."""
    return st.sampled_from([True] * weight + [False]).flatmap(lambda ok: valid if ok else invalid)


GOOD_VALUE = {"p": st.sampled_from(["1", "2", "1.5"]), "seed": st.integers(0, 9).map(str),
              "sparsity": st.sampled_from(["0.25", "0.5"]), "align": st.sampled_from(["1", "8"]),
              "trials": st.sampled_from(["1", "2"]), "scope": st.sampled_from(["uniform", "global"])}
OPTIONS = {"magnitude": ["p"], "random": ["seed"], "select": ["sparsity", "align", "scope"], "verify": ["trials", "seed"],
           "lamp": [], "analyze": []}
BAD_VALUE = st.sampled_from(["0", "-1", "abc", "'x'", "[1]", "1e999", "True", ""])


@st.composite
def pass_item(draw):
    name = draw(mix(st.sampled_from(sorted(OPTIONS)), st.sampled_from(["bogus", "Magnitude"]), 8))
    keys = draw(st.lists(mix(st.sampled_from(OPTIONS.get(name) or ["q"]), st.sampled_from(["q", "P"])),
                         max_size=2, unique=True)) if OPTIONS.get(name) else draw(st.just([]) | st.just(["q"]))
    return name, {k: draw(mix(GOOD_VALUE[k], BAD_VALUE) if k in GOOD_VALUE else BAD_VALUE) for k in keys}


SPARSITY = mix(st.sampled_from(["0", "0.3", "0.5", "0.9"]), st.sampled_from(["1", "-0.1", "abc", "nan", "", "2"]))
ALIGN = mix(st.sampled_from(["1", "4", "8", "16", "40"]), st.sampled_from(["0", "-3", "abc", "1.5"]))
SHAPE = mix(st.sampled_from([None, None, "1,3,8,8", "2,3,8,8"]),
            st.one_of(st.sampled_from(["1,3", "1,1,8,8", "1,3,16,16", "a,b", "1x3x8x8", "99999,3,999,999", "0,3,8,8",
                                       ""]),
                      st.lists(st.integers(-1, 9), max_size=5).map(lambda d: ",".join(map(str, d)))))
KINDS = mix(st.sampled_from([None, "residual,heads,head_dim,mlp", "mlp", "heads,mlp", "head_dim"]),
            st.lists(st.sampled_from(["tokens", "", "mlp", "MLP"]), min_size=1, max_size=3).map(",".join))
TARGET = mix(st.sampled_from(["channels", "params", "macs"]), st.sampled_from(["flops", "", "Channels"]))
PASSES = mix(st.none(), st.lists(pass_item(), min_size=1, max_size=3).map(lambda items: passes_text(items)), 1)
# where an output goes: nowhere, a good file, a folder that does not exist, a read-only folder, an existing folder
PLACE = mix(st.sampled_from([None, "good"]), st.sampled_from(["missing", "read-only", "folder"]), 4)
ONNX = mix(st.none(), st.sampled_from(["good", "missing", "read-only", "folder"]), 4)  # an export takes seconds


def passes_text(items) -> str:
    return ",".join(name + ("{" + ",".join(f"{k}={v}" for k, v in opts.items()) + "}" if opts else "")
                    for name, opts in items)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    torch.save(tiny_vit(embed_dim=32, num_heads=2, img_size=8, patch_size=4), path)  # input 1,3,8,8 from its cfg
    return path


@pytest.fixture(scope="module")
def read_only(tmp_path_factory):
    if os.geteuid() == 0:
        return Path("/sys")  # root ignores permissions; /sys refuses new files even to root
    folder = tmp_path_factory.mktemp("ro")
    folder.chmod(0o500)
    return folder


def output_path(place, root: Path, read_only: Path, name: str):
    return {None: None, "good": root / name, "missing": root / "missing" / name, "read-only": read_only / name,
            "folder": root}[place]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sparsity=SPARSITY, align=ALIGN, shape=SHAPE, prune=KINDS, target=TARGET, passes=PASSES, out=PLACE,
       report=PLACE, onnx=ONNX)
def test_any_arguments_exit_cleanly(model_file, read_only, capsys, sparsity, align, shape, prune, target, passes,
                                    out, report, onnx):
    root = Path(tempfile.mkdtemp())
    args = ["compile", str(model_file), "--sparsity", sparsity, "--align", align, "--target", target]
    args += ["--input-shape", shape] if shape is not None else []
    args += ["--prune", prune] if prune is not None else []
    args += ["--passes", passes] if passes is not None else []
    outputs = {}
    for flag, place, name in (("-o", out, "o.pt2"), ("--report", report, "r.json"), ("--onnx", onnx, "o.onnx")):
        path = output_path(place, root, read_only, name)
        if path is not None:
            args += [flag, str(path)]
            outputs[flag] = path
    code = run(args)
    shown = capsys.readouterr()
    assert code in (0, 2, 3), (args, shown.err)
    assert "Traceback" not in shown.out + shown.err, args
    if code == 0:
        assert all(p.is_file() for p in outputs.values()), args
        assert not [p for p in root.iterdir() if ".tmp" in p.name], args
    else:
        assert shown.err.startswith("vitcc: error:") and shown.err.count("\n") == 1, (args, shown.err)
        assert list(root.iterdir()) == [], (args, list(root.iterdir()))
