import pytest
import torch

import vitcc
from vitcc.errors import VitccError
from vitcc.pipeline import (REGISTRY, Insertion, Pass, PassResult, build_pipeline, format_pipeline, parse_pipeline,
                            register_pass)

from conftest import image, tiny_vit


def test_pipeline_strings_round_trip_with_options():
    items = parse_pipeline("magnitude{p=1},select{sparsity=0.5},lamp")
    assert items == [("magnitude", {"p": 1}), ("select", {"sparsity": 0.5}), ("lamp", {})]
    passes = build_pipeline("magnitude{p=1},select{sparsity=0.5}")
    text = format_pipeline(passes)
    assert text == "analyze,magnitude{p=1},select{sparsity=0.5},rewrite,fold,dce,verify"
    assert format_pipeline(build_pipeline(text)) == text


def test_unknown_pass_lists_the_valid_ones():
    with pytest.raises(VitccError, match="unknown pass 'nope'.*magnitude.*random"):
        build_pipeline("nope")


def test_malformed_pipeline_is_a_clear_error():
    with pytest.raises(VitccError, match="cannot parse"):
        parse_pipeline("magnitude{p=1")


def test_custom_pass_inserted_after_select_can_change_the_selection():
    seen = []

    @register_pass("test-keep-first-heads")
    class KeepFirstHeads(Pass):
        def run(self, program):
            seen.append([g.name for g in program.groups])
            for g in program.groups:
                if g.kind == "heads":
                    program.keep[g.name] = [0]
            return PassResult()

    try:
        r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.25, example_inputs=(image(),),
                          insert=[Insertion(KeepFirstHeads(), after="select")])
    finally:
        REGISTRY.pop("test-keep-first-heads")
    assert seen and "blocks.0.attn.heads" in seen[0]
    assert list(r.selection["blocks.0.attn.heads"]) == [0]
    assert r.module.get_submodule("blocks.0.attn.qkv").out_features == 3 * 1 * 12
    assert [p["name"] for p in r.report["passes"]][:4] == ["analyze", "magnitude", "select", "test-keep-first-heads"]


def test_insert_next_to_an_unknown_anchor_is_an_error():
    class Noop(Pass):
        name = "noop"

        def run(self, program):
            return PassResult(modified=False)

    with pytest.raises(VitccError, match="no pass named 'fuse'"):
        build_pipeline("magnitude", [Insertion(Noop(), before="fuse")])


def test_a_failing_pass_is_named_with_what_ran_before():
    class Broken(Pass):
        name = "broken"

        def run(self, program):
            raise ValueError("boom")

    with pytest.raises(RuntimeError, match=r"pass 'broken' failed after \[analyze, magnitude, select\]"):
        vitcc.compile(tiny_vit(), "magnitude", sparsity=0.5, example_inputs=(image(),),
                      insert=[Insertion(Broken(), after="select")])


def test_entry_point_group_is_read(monkeypatch):
    import vitcc.pipeline as pl

    class EP:
        name = "from-plugin"

        def load(self):
            class Plugin(Pass):
                def run(self, program):
                    return PassResult(modified=False)
            return Plugin

    monkeypatch.setattr(pl, "_loaded", False)
    monkeypatch.setattr(pl, "entry_points", lambda group: [EP()] if group == "vitcc.passes" else [])
    try:
        assert "from-plugin" in pl.load_passes()
    finally:
        REGISTRY.pop("from-plugin", None)
