"""Graph surgery for training a compact GraphModule: stochastic depth on its residual branches, and a new
classifier for a data set with other classes.

Stochastic depth (`drop_path_copy`). The compact graph was captured in eval mode: timm's DropPath is not in
it, and a graph of any other source never had one. vitcc knows the residual branches from the graph itself
(`vitcc.analysis.branches`: each branch's add onto the stream and the operand it computes), so the training
copy puts a DropPath (timm.layers.DropPath: each sample's branch output dropped with probability p, the rest
scaled by 1/(1-p)) on each branch output, just before its add. The copy shares every parameter and buffer
with the compact graph, which itself is never changed: evaluation, the saved program and the ONNX file
stay deterministic. Rates grow linearly with depth, as timm's `drop_path_rate` does, but per branch rather
than per block: 0 at the first branch, `rate` at the last. The compile records each kept branch on its add
node (`node.meta["vitcc_branch"]`: the branch's name and output node; node meta lives as long as the node,
through rewrite, fold and dce, and never outlives the graph); a graph without that record (a loaded
program) is analysed again.

A new classifier (`replace_classifier`): the Linear that computes the graph's output gets new weights of
`num_classes` rows (timm's ViT initialisation: truncated normal, std 0.02, zero bias) under the same
parameter names, so state dicts and checkpoints keep their keys.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.fx as fx
from timm.layers import DropPath
from torch import nn

from vitcc.devices import failure_as_line
from vitcc.errors import VitccError, first_line
from vitcc.ir.types import attr_at

__all__ = ["drop_path_copy", "residual_branches", "record_branches", "replace_classifier", "output_classes",
           "BRANCH_META"]

aten = torch.ops.aten
BRANCH_META = "vitcc_branch"  # add node meta: {"name", "output"} of the residual branch the add puts on the stream


def record_branches(gm: fx.GraphModule, branches) -> int:
    """Mark the add node of each of `branches` (vitcc.analysis.branches.Branch, or dicts with name, add and
    output) that `gm` still has; how many were marked."""
    nodes = {n.name: n for n in gm.graph.nodes}
    marked = 0
    for b in branches:
        get = b.get if isinstance(b, dict) else lambda k, b=b: getattr(b, k)
        add, out = nodes.get(get("add")), nodes.get(get("output"))
        if add is not None and out is not None and out in add.args:
            add.meta[BRANCH_META] = {"name": get("name"), "output": out.name}
            marked += 1
    return marked


class BranchDropPath(DropPath):
    """timm's DropPath over a batch axis that need not be the first."""

    def __init__(self, drop_prob: float, batch_axis: int = 0):
        super().__init__(drop_prob)
        self.batch_axis = batch_axis

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.batch_axis == 0:
            return super().forward(x)
        return super().forward(x.movedim(self.batch_axis, 0)).movedim(0, self.batch_axis)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, batch_axis={self.batch_axis}"


def residual_branches(gm: fx.GraphModule, example: torch.Tensor) -> list[dict]:
    """The residual branches of `gm` in graph order: {"name", "add", "output"} (node names)."""
    recorded = [{"add": n.name, **n.meta[BRANCH_META]} for n in gm.graph.nodes if BRANCH_META in n.meta]
    if not recorded:
        from vitcc.analysis.refresh import refresh
        from vitcc.ir.program import Program, working_copy
        work, _ = working_copy(gm)
        program = Program(gm=work, example_inputs=(example[:1],), original=work)
        with failure_as_line(lambda e: "--drop-path needs the residual branches of the model, and its graph "
                                       f"could not be analysed: {first_line(e)}"):
            refresh(program, "shapes", "coupling")
        recorded = [{"name": b.name, "add": b.add, "output": b.output} for b in program.branches]
    nodes = {n.name: n for n in gm.graph.nodes}
    return [b for b in recorded if b["add"] in nodes and b["output"] in nodes
            and nodes[b["output"]] in nodes[b["add"]].args]


class _Shapes(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, names: set[str]):
        super().__init__(gm)
        self.names, self.shapes = names, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names and isinstance(out, torch.Tensor):
            self.shapes[n.name] = tuple(out.shape)
        return out


def _batch_axes(gm: fx.GraphModule, names: Sequence[str], example: torch.Tensor) -> dict[str, int]:
    """Node name -> the axis that grows with the batch (run at batch 1 and 2); nodes without exactly one such
    axis are left out (they are not per-sample, and a drop there would not be stochastic depth)."""
    was = gm.training
    gm.eval()
    shapes = []
    try:
        with torch.no_grad():
            for b in (1, 2):
                x = example[:1].expand(b, *example.shape[1:]).contiguous()
                run = _Shapes(gm, set(names))
                with failure_as_line(lambda e: f"--drop-path: the model does not run on a batch of {b} "
                                               f"({first_line(e)}); training needs one that takes any batch size"):
                    run.run(x)
                shapes.append(run.shapes)
    finally:
        gm.train(was)
    axes = {}
    for name in names:
        s1, s2 = shapes[0].get(name), shapes[1].get(name)
        if s1 is None or s2 is None or len(s1) != len(s2):
            continue
        grown = [i for i, (a, b) in enumerate(zip(s1, s2)) if a != b]
        if len(grown) == 1 and s2[grown[0]] == 2 * s1[grown[0]]:
            axes[name] = grown[0]
    return axes


def drop_path_copy(gm: fx.GraphModule, rate: float, example: torch.Tensor) -> tuple[fx.GraphModule, list[dict]]:
    """A training copy of `gm` with DropPath on its residual branches, sharing `gm`'s parameters and buffers;
    and per branch {"name", "rate"}. `example` is one input batch (its first image is used)."""
    if not 0.0 <= rate < 1.0:
        raise VitccError(f"--drop-path must be in [0, 1), got {rate}")
    if not isinstance(gm, fx.GraphModule):
        raise VitccError("--drop-path applies to a compiled (fx) model; an eager model has its own drop-path rate "
                         "(timm: create_model(..., drop_path_rate=P))")
    example = example.to(next(iter(gm.parameters()), example).device)
    branches = residual_branches(gm, example)
    if not branches:
        raise VitccError("--drop-path: the model has no residual branches (adds onto a residual stream) to drop")
    axes = _batch_axes(gm, [b["output"] for b in branches], example)
    branches = [b for b in branches if b["output"] in axes]
    if not branches:
        raise VitccError("--drop-path: no residual branch of the model has a batch axis to drop samples along")
    graph = copy.deepcopy(gm.graph)  # same node names; parameters are read by get_attr, shared below
    train = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    nodes = {n.name: n for n in graph.nodes}
    placed = []
    for i, (b, p) in enumerate(zip(branches, linear_rates(rate, len(branches)))):
        placed.append({"name": b["name"], "rate": p})
        if p <= 0.0:
            continue
        target = f"vitcc_drop_path_{i}"
        train.add_submodule(target, BranchDropPath(p, axes[b["output"]]))
        add, out = nodes[b["add"]], nodes[b["output"]]
        with graph.inserting_before(add):
            dropped = graph.call_module(target, (out,))
        add.replace_input_with(out, dropped)
    graph.lint()
    train.recompile()
    train.train(gm.training)
    return train, placed


# ------------------------------------------------------------------------------------------ classifier

def _output_node(gm: fx.GraphModule) -> fx.Node:
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    value = out.args[0]
    while isinstance(value, (tuple, list)) and len(value) == 1:
        value = value[0]
    if not isinstance(value, fx.Node):
        raise VitccError("--num-classes: the model returns several values; it needs a model that returns class logits")
    return value


def _set_param(gm: nn.Module, target: str, value: nn.Parameter) -> None:
    owner, _, leaf = target.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    if leaf in module._parameters or not hasattr(module, leaf):
        module.register_parameter(leaf, value)
    else:
        raise VitccError(f"--num-classes: {target} is not a parameter of the model")


def replace_classifier(gm: fx.GraphModule, num_classes: int) -> dict:
    """Give the Linear that computes `gm`'s output `num_classes` new rows, in place; {"param", "before",
    "after"}. A one-line error when the output is not a Linear's (of parameters only it reads)."""
    if isinstance(num_classes, bool) or int(num_classes) != num_classes or num_classes < 1:
        raise VitccError(f"--num-classes must be a whole number >= 1, got {num_classes}")
    node = _output_node(gm)
    if node.op != "call_function" or node.target is not aten.linear.default:
        raise VitccError(f"--num-classes: the model's output is computed by {node.target}, not by a linear "
                         "classifier, so there is no head to replace")
    w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    for t in (w, b):
        if t is None:
            continue
        if not (isinstance(t, fx.Node) and t.op == "get_attr") or set(t.users) != {node}:
            raise VitccError("--num-classes: the classifier's weights are also read elsewhere in the model "
                             "(tied weights), so it cannot be replaced alone")
    old = attr_at(gm, w.target)
    before, features = old.shape
    head = nn.Linear(features, int(num_classes), device=old.device, dtype=old.dtype)
    with torch.no_grad():
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
    _set_param(gm, w.target, head.weight)
    if b is not None:
        _set_param(gm, b.target, head.bias)
    else:
        prefix = w.target.rpartition(".")[0]
        owner = gm.get_submodule(prefix) if prefix else gm
        leaf = "bias" if getattr(owner, "bias", None) is None and "bias" not in owner._buffers else "vitcc_bias"
        name = f"{prefix}.{leaf}" if prefix else leaf
        _set_param(gm, name, head.bias)
        with gm.graph.inserting_before(node):
            bias_node = gm.graph.get_attr(name)
        node.args = (*node.args[:2], bias_node, *node.args[3:])
    for n in (node, *node.users):
        n.meta.pop("tensor_meta", None)
        n.meta.pop("val", None)
    gm.graph.lint()
    gm.recompile()
    cfg = gm.meta.get("pretrained_cfg")
    if isinstance(cfg, dict) and "num_classes" in cfg:
        gm.meta["pretrained_cfg"] = {**cfg, "num_classes": int(num_classes)}
    return {"param": w.target, "before": int(before), "after": int(num_classes)}


def output_classes(model: nn.Module, example: torch.Tensor) -> int | None:
    """How many class logits the model returns for one image (None: its output is not (batch, classes))."""
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example[:1])
    finally:
        model.train(was)
    out = out[0] if isinstance(out, (tuple, list)) else out
    return int(out.shape[1]) if isinstance(out, torch.Tensor) and out.dim() == 2 else None


def linear_rates(rate: float, n: int) -> list[float]:
    """timm's linear drop-path rule over n units: 0 at the first, `rate` at the last."""
    return [rate * i / (n - 1) if n > 1 else rate for i in range(n)] if n else []

