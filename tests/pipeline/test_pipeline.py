import copy

import pytest
import torch

import vitcc
from vitcc.pipeline import manager, pass_base
from vitcc.errors import VitccError
from vitcc.pipeline.manager import Insertion, PassRegistry, build_pipeline, format_pipeline, make_pass, parse_pipeline
from vitcc.pipeline.pass_base import Option, Pass, PassResult, register_pass

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

    class KeepFirstHeads(Pass):
        name = "test-keep-first-heads"

        def run(self, program):
            seen.append([g.name for g in program.groups])
            for g in program.groups:
                if g.kind == "heads":
                    program.keep[g.name] = [0]
            return PassResult()

    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.25, example_inputs=(image(),),
                      insert=[Insertion(KeepFirstHeads(), after="select")])
    assert seen and "blocks.0.attn.heads" in seen[0]
    assert list(r.selection["blocks.0.attn.heads"]) == [0]
    assert r.module.get_submodule("blocks.0.attn.qkv").weight.shape[0] == 3 * 1 * 12
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

    class Plugin(Pass):
        def run(self, program):
            return PassResult(modified=False)

    class EP:
        name = "from-plugin"

        def load(self):
            return Plugin

    monkeypatch.setattr(manager, "entry_points", lambda group: [EP()] if group == "vitcc.passes" else [])
    registry = PassRegistry.default()
    assert "from-plugin" in registry and registry.get("from-plugin").name == "from-plugin"
    assert Plugin.name == "" and "from-plugin" not in pass_base._DECLARED  # the plug-in's class is left as it was


# -- typed options --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, message", [
    ("magnitude{q=3}", r"unknown option 'q' in magnitude\{q=3\}; valid options of magnitude: p: float = 2"),
    ("magnitude{p=abc}", r"option p takes a float .*got 'abc'; valid options of magnitude: p: float"),
    ("taylor{batch=2.5}", r"option batch takes an int"),
    ("gohsp{ranking=pagerank}", r"option ranking takes one of markov, norm"),
    ("dimap{scope=block}", r"scope takes one of module, global, layer"),
    ("select{align=x}", r"valid options of select: sparsity: float; prune: str; target: channels"),
    ("verify{trails=3}", r"unknown option 'trails'.*trials: int = 2"),
    ("analyze{fast=1}", r"analyze takes no options"),
    ("lamp{p=1}", r"lamp takes no options"),
])
def test_bad_pass_options_are_one_line_errors_listing_the_valid_ones(spec, message):
    with pytest.raises(VitccError, match=message) as e:
        build_pipeline(spec)
    assert "\n" not in str(e.value)


def test_options_keep_their_values_and_defaults():
    p = make_pass("magnitude", {"p": 1})
    assert p.options == {"p": 1} and p.option("p") == 1 and make_pass("magnitude").option("p") == 2
    assert make_pass("vtp").option("epochs") is None  # unset: the pass computes it
    assert repr(make_pass("select", {"prune": "heads,mlp", "sparsity": 0.5})) == "select{prune='heads,mlp';sparsity=0.5}"
    text = format_pipeline(build_pipeline("magnitude,select{prune='heads,mlp';sparsity=0.5}"))
    assert format_pipeline(build_pipeline(text)) == text


def test_every_built_in_pass_declares_options_with_help():
    registry = PassRegistry.default()
    for name in registry.names():
        for o in registry.get(name).options_spec:
            assert isinstance(o, Option) and o.help, (name, o.name)
            if o.default is not None:
                assert o.coerce(o.default) == o.default


def test_a_user_pass_declares_its_options():
    class Weighted(Pass):
        name = "test-weighted"
        options_spec = (Option("w", float, 1.0, "weight"), Option("mode", str, "a", "mode", choices=("a", "b")))

        def run(self, program):
            return PassResult(modified=False)

    registry = PassRegistry()
    registry.add(Weighted)
    assert registry.make("test-weighted", {"w": 2, "mode": "b"}).options == {"w": 2, "mode": "b"}
    with pytest.raises(VitccError, match="mode takes one of a, b"):
        registry.make("test-weighted", {"mode": "c"})
    with pytest.raises(VitccError, match="unknown option 'x'.*w: float = 1.0; mode: a\\|b = 'a'"):
        Weighted(x=1)


# -- registry views -------------------------------------------------------------------------------------------

def test_a_registry_addition_stays_in_that_registry():
    class Noop(Pass):
        def run(self, program):
            return PassResult(modified=False)

    mine = PassRegistry.default()
    mine.add(Noop, "test-noop")
    assert "test-noop" in mine and "test-noop" not in PassRegistry.default()
    assert [p.name for p in build_pipeline("magnitude,test-noop", registry=mine)][1:3] == ["magnitude", "test-noop"]
    with pytest.raises(VitccError, match="unknown pass 'test-noop'"):
        build_pipeline("magnitude,test-noop")
    r = vitcc.compile(tiny_vit(), "magnitude,test-noop", sparsity=0.25, example_inputs=(image(),), registry=mine)
    assert "test-noop" in r.report["pipeline"]
    assert Noop.name == ""  # registering under a name made a subclass; the user's class is untouched


def test_register_pass_reaches_every_later_registry(declared_passes):

    @register_pass("test-declared")
    class Declared(Pass):
        def run(self, program):
            return PassResult(modified=False)

    assert PassRegistry.default().get("test-declared") is Declared
    assert vitcc.register_pass is register_pass


# -- analyses: valid or recomputed ----------------------------------------------------------------------------

aten = torch.ops.aten


class ScaleByOne(Pass):
    """Changes the graph (x * 1.0 after the first linear) without saying so; optionally rebases the reference."""
    name = "test-scale-by-one"
    needs = frozenset()

    def __init__(self, rebase=True):
        super().__init__()
        self.rebase, self.node = rebase, None

    def run(self, program):
        g = program.gm.graph
        linear = next(n for n in g.nodes if n.target is aten.linear.default)
        with g.inserting_after(linear):
            self.node = g.call_function(aten.mul.Tensor, (linear, 1.0))
        linear.replace_all_uses_with(self.node, delete_user_cb=lambda u: u is not self.node)
        program.gm.recompile()
        if self.rebase:
            program.original = copy.deepcopy(program.gm)
        return PassResult()


def test_after_compile_shapes_describe_the_compact_graph_and_coupling_the_original():
    from vitcc.search.cost import estimate
    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.5, example_inputs=(image(),))
    p = r.program
    assert p.stale == {"coupling"}  # rewrite compacted the graph; shapes were recomputed, coupling is the original's
    qkv = next(n for n in p.gm.graph.nodes if n.target is aten.linear.default)
    rows = p.gm.get_parameter(qkv.args[1].target).shape[0]
    assert rows < 144 and qkv.meta["tensor_meta"].shape[-1] == rows and "val" not in qkv.meta
    before = next(n for n in p.original.graph.nodes if n.name == qkv.name)
    assert before.meta["tensor_meta"].shape[-1] == 144 == p.coupling.types[qkv.name][-1][0].size
    with pytest.raises(VitccError, match="counting compact shapes needs the coupling analysis of the graph"):
        estimate(p, {})


def test_a_pass_that_changes_the_graph_gets_it_reanalysed_before_the_next_pass_that_needs_it():
    edit = ScaleByOne()
    r = vitcc.compile(tiny_vit(), [edit, make_pass("magnitude")], sparsity=0.5, example_inputs=(image(),))
    assert edit.node.name in r.program.coupling.types  # the node the edit made has a type: analysed again
    assert r.report["max_abs_error"] < 1e-4


def test_a_graph_change_without_a_new_reference_is_named():
    with pytest.raises(VitccError, match="'select' needs the channel coupling of the graph, but "
                                         "'test-scale-by-one' changed the graph"):
        vitcc.compile(tiny_vit(), [ScaleByOne(rebase=False), make_pass("magnitude")], sparsity=0.5,
                      example_inputs=(image(),))


def test_a_pass_that_needs_the_coupling_after_rewrite_is_refused_not_run_on_the_compact_graph():
    class Late(Pass):
        name = "test-late"
        needs = frozenset({"coupling"})

        def run(self, program):
            return PassResult(modified=False)

    with pytest.raises(VitccError, match=r"'test-late' needs the channel coupling.*'rewrite' changed the graph.*"
                                         r"after rewrite the graph is compact"):
        vitcc.compile(tiny_vit(), "magnitude", sparsity=0.5, example_inputs=(image(),),
                      insert=[Insertion(Late(), after="rewrite")])


def test_a_pass_after_rewrite_that_declares_nothing_sees_compact_shapes_and_the_original_coupling():
    seen = {}

    class Late(Pass):
        name = "test-late"

        def run(self, program):
            qkv = next(n for n in program.gm.graph.nodes if n.target is aten.linear.default)
            seen.update(stale=set(program.stale), rows=qkv.meta["tensor_meta"].shape[-1],
                        types=qkv.name in program.coupling.types)
            return PassResult(modified=False)

    r = vitcc.compile(tiny_vit(), "magnitude", sparsity=0.5, example_inputs=(image(),),
                      insert=[Insertion(Late(), after="rewrite")])
    assert seen == {"stale": {"coupling"}, "rows": r.module.get_parameter("blocks.0.attn.qkv.weight").shape[0],
                    "types": True}


@pytest.mark.parametrize("preserved, changed, stale", [
    (None, False, set()), (None, True, {"shapes", "coupling"}), ({"coupling"}, True, {"shapes"}),
    (frozenset(), False, {"shapes", "coupling"}), ({"shapes", "coupling"}, True, set())])
def test_the_manager_marks_stale_what_a_pass_did_not_preserve(preserved, changed, stale):
    from vitcc.pipeline.manager import _invalidated, graph_signature
    from conftest import analyzed
    p = analyzed()
    before = graph_signature(p.gm)
    if changed:
        ScaleByOne().run(p)
    _invalidated(p, PassResult(preserved=preserved), before)
    assert p.stale == stale
    p.require(*({"shapes", "coupling"} - stale))
    if stale:
        with pytest.raises(VitccError, match="needs the .* analysis"):
            p.require("shapes", "coupling")


def test_refresh_recomputes_what_is_stale():
    from vitcc.analysis.refresh import refresh
    from conftest import analyzed
    p = analyzed()
    edit = ScaleByOne()
    edit.run(p)
    p.stale |= {"shapes", "coupling"}
    refresh(p)
    assert not p.stale and edit.node.name in p.coupling.types and "tensor_meta" in edit.node.meta
    with pytest.raises(VitccError, match="unknown analysis 'types'"):
        refresh(p, "types")


def _storages(module) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in module.state_dict().values()}


@pytest.mark.parametrize("prune", [None, "mlp"])
def test_compile_leaves_the_model_as_it_was_and_hands_back_tensors_of_its_own(prune):
    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = vitcc.compile(model, "magnitude", sparsity=0.5, prune=prune, example_inputs=(image(),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # with prune=mlp the attention weights are not sliced: they are still copied before being handed back
    assert not _storages(r.module) & _storages(model)


def test_a_pass_that_writes_weights_in_place_writes_a_copy_never_the_model_or_the_reference():
    class Double(Pass):
        name = "test-double"  # writes_weights by default: the manager gives it tensors of its own

        def run(self, program):
            with torch.no_grad():
                for t in program.gm.parameters():
                    t.mul_(2)
            return PassResult()

    model = tiny_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the reference is still the model as given, so the doubled weights cannot pass as a pruning of it
    with pytest.raises(VitccError, match="verification failed"):
        vitcc.compile(model, [make_pass("magnitude"), Double()], sparsity=0.5, example_inputs=(image(),))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_reported_macs_are_flop_counter_counts_of_both_models():
    from vitcc.metrics import count_macs
    model, x = tiny_vit(), image(batch=1)
    r = vitcc.compile(model, "magnitude", sparsity=0.5, example_inputs=(x,))
    assert r.report["macs_before"] == count_macs(model, (x,)) > r.report["macs_after"] == count_macs(r.module, (x,))
    r = vitcc.compile(model, "magnitude", sparsity=0.5, example_inputs=(x,), verify=False)
    assert r.report["macs_after"] == count_macs(r.module, (x,))
