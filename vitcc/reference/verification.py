"""What verify compares: the compact graph against the masked reference, tensor by tensor.

The output alone is not enough: a zero-initialised classifier (torchvision's ViT as built, timm's hiera)
makes both sides zero, so a wrong rewrite would pass. Verify therefore also compares the residual stream
at every block boundary and every branch (attention, MLP) that feeds it, each at the kept positions
(the compact tensor holds only the kept channels; the reference is gathered at their flat positions).

Errors are relative to each tensor's scale, the largest |reference| at the kept positions: the same
rule the output check has always used (a tensor passes when `max|compact - ref| <= atol + rtol * scale`),
and robust where a tensor's RMS is tiny next to a few large channels, as residual streams often are.

A check whose reference is constant, or identical on two different inputs, proves nothing and is
reported as `vacuous`; it is still compared (a mismatch is a failure), but only the other checks give
the comparison its meaning.

The report names each tensor for what it is (`tensor_labels`: `blocks.3.attn output`, `blocks.3 residual`),
keeps the graph node's name beside it, and lists the worst first; it names a worst tensor only where some
tensor differs at all.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from vitcc.frontend.capture import ShapeRecording
from vitcc.ir.types import is_ttype
from vitcc.devices import exact_float32
from vitcc.errors import VerificationError
from vitcc.ir.program import Program, writes_in_place
from vitcc.ir.shapes import axis_mask
from vitcc.analysis.branches import stream_adds
from vitcc.analysis.groups import model_blocks
from vitcc.reference.masking import MaskedInterpreter
from vitcc.metrics import macs_counter

_COMPUTED = ("call_function", "call_method", "call_module")


@dataclass
class Check:
    """One compared tensor, accumulated over the verification inputs."""
    name: str  # the graph node, or the output leaf (`output`, `output['logits']`)
    max_abs_error: float = 0.0
    scale: float = 0.0  # the largest |reference| over the inputs
    constant: bool = True  # the reference was constant on every input so far
    independent: bool = False  # the reference was identical on two different inputs
    ok: bool = True
    problem: str = ""  # why it could not be compared value by value (shape, structure, a crash)

    @property
    def max_rel_error(self) -> float:
        """Against the largest |reference|, not the largest per-input ratio: a tensor near zero on one input (one
        kept v dim of random weights, 2e-5 there) turned a rounding error of 6e-9 into a "relative error" of 2e-4."""
        return self.max_abs_error / max(self.scale, 1e-12)

    @property
    def vacuous(self) -> bool:
        return self.constant or self.independent

    label: str = ""  # what it is, for people (`tensor_labels`)

    def to_json(self) -> dict:
        return {"name": self.label or self.name, "node": self.name, "max_abs_error": self.max_abs_error,
                "max_rel_error": self.max_rel_error, "scale": self.scale}

    @property
    def badness(self) -> tuple[bool, float, float]:
        """What orders the checks worst first: failed, then relative, then absolute error."""
        return not self.ok, self.max_rel_error, self.max_abs_error


def compared_nodes(program: Program) -> list[str]:
    """The internal tensors verify compares, in graph order: the residual stream and its branches.

    A residual-stream tensor is the output of an add whose last axis carries a `residual` group (the
    residual adds, the position-embedding add), or of an add of two computed tensors of one shape (a
    skip connection, also where the stream itself is not prunable, as behind torchvision's
    MultiheadAttention); its computed inputs are the skip and the branch outputs (attention, MLP, after
    any layer scale). Broadcasting adds (a bias table or mask on attention logits) are not the stream.
    Chosen from the graph and its types, never from node names, so it holds for fx-traced and
    torch.export (aten) graphs alike. Parameters and inputs are not compared: they do not depend on the
    rewrite's arithmetic.
    """
    types = program.coupling.types
    chosen: dict[str, None] = {}
    for node in stream_adds(program.original.graph, types, program.groups):
        for arg in node.all_input_nodes:
            if arg.op in _COMPUTED and is_ttype(types.get(arg.name)):
                chosen[arg.name] = None
        chosen[node.name] = None
    return list(chosen)


def tensor_labels(program: Program, names: Sequence[str]) -> dict[str, str]:
    """What each compared node is, by block and role, from the residual branches and blocks the analysis
    found (never from node names): `blocks.3.attn output` (a branch's output), `blocks.3 residual` (the
    stream a block leaves), `blocks.3 residual after attn` (between its branches), `blocks.3 input` (the
    stream it reads), `blocks.3 residual before mlp` (a branch's skip that is none of these, such as Swin's
    reshaped stream). Other nodes (the stem's token concatenation, a position-embedding add, a stage's
    patch merging) are named by where they lie (`stem`, `before BLOCK`, `head`), their module and op."""
    blocks = [b["name"] for b in model_blocks(program.groups)[0]]

    def block_of(branch: str) -> str | None:
        inside = [b for b in blocks if b == "" or branch.startswith(b + ".")]
        return max(inside, key=len) if inside else None

    by_block: dict[str | None, list] = {}
    for b in program.branches:
        by_block.setdefault(block_of(b.name), []).append(b)
    labels: dict[str, str] = {}
    for block, branches in by_block.items():
        where = block or "model"
        for i, b in enumerate(branches):
            labels.setdefault(b.output, f"{b.name} output")
            leaf = b.name[len(block) + 1:] if block else b.name
            labels.setdefault(b.add, f"{where} residual" if i == len(branches) - 1 or block is None
                              else f"{where} residual after {leaf}")
    for block, branches in by_block.items():  # skips last: most are the stream an earlier add already named
        for i, b in enumerate(branches):
            leaf = b.name[len(block) + 1:] if block else b.name
            labels.setdefault(b.skip, f"{block} input" if block is not None and i == 0
                              else f"{block or 'model'} residual before {leaf}")
    nodes = {n.name: n for n in program.original.graph.nodes}
    order = {name: i for i, name in enumerate(nodes)}
    adds = sorted((order[b.add], block_of(b.name)) for b in program.branches if b.add in order)
    out: dict[str, str] = {}
    for name in names:
        label = labels.get(name)
        if label is None and name in nodes:
            label = _placed(nodes[name], order[name], adds)
        label = label or name
        out[name] = label if label not in out.values() else f"{label} ({name})"
    return out


def _placed(node: fx.Node, index: int, adds: list[tuple[int, str | None]]) -> str:
    """A node no branch names: where it lies among the blocks, the module that computed it and its op."""
    after = next((block for i, block in adds if i > index), None)
    place = "stem" if adds and index < adds[0][0] else "head" if not adds or after is None else f"before {after}"
    stack = node.meta.get("nn_module_stack") or {}
    module = str(list(stack.values())[-1][0]) if stack else ""
    packet = getattr(node.target, "overloadpacket", node.target)
    op = getattr(packet, "__name__", str(packet))
    return f"{place}: {module} {op}" if module else f"{place}: {op}"


def tensor_leaves(obj: Any, prefix: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of a model output, named by its path (dicts, tuples, lists, dataclasses, HF outputs)."""
    leaves, _ = pytree.tree_flatten_with_path(obj)
    for path, leaf in leaves:
        name = prefix + pytree.keystr(path)
        if isinstance(leaf, torch.Tensor):
            yield name, leaf
        elif dataclasses.is_dataclass(leaf) and not isinstance(leaf, type):  # not registered with pytree
            for f in dataclasses.fields(leaf):
                yield from tensor_leaves(getattr(leaf, f.name), f"{name}.{f.name}")


class _Recording:
    """Mixin for an fx.Interpreter: keeps the values of the named nodes, and only those."""

    def __init__(self, *args: Any, names: Sequence[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.names = list(names)  # graph order, for the report
        self._wanted = set(names)
        self._snapshot = writes_in_place(self.module.graph)  # a later add_ or relu_ must not change what is compared
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n.name in self._wanted:
            self.values[n.name] = out.clone() if self._snapshot and isinstance(out, torch.Tensor) else out
        return out


class _CompactRecorder(_Recording, ShapeRecording, fx.Interpreter):
    """Runs the compact graph. On the example input it also records the graph's shapes, and its MACs are
    counted (`_run_both`): the shapes analysis of the compact graph, which would otherwise cost a run more."""
    recording = False


class _MaskedRecorder(_Recording, MaskedInterpreter):
    pass


def verification_inputs(example_inputs: tuple, trials: int, seed: int) -> list[tuple]:
    """The example input, then fresh random floating inputs of its shapes (at least two in all: the
    second tells a check that ignores its input), drawn on the CPU (the same on every device) and put
    where the example is."""
    gen = torch.Generator().manual_seed(seed)
    inputs = [tuple(example_inputs)]
    for _ in range(max(trials, 2) - 1):
        inputs.append(tuple(torch.randn(x.shape, generator=gen, dtype=x.dtype).to(x.device)
                            if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                            for x in example_inputs))
    return inputs


def verify(program: Program, keep: dict[int, np.ndarray], *, trials: int = 2, rtol: float = 1e-4,
           atol: float = 1e-5, seed: int = 0) -> dict:
    """Compare compact and masked on every chosen tensor and output leaf; the report, or VerificationError.
    Both run in full float32 (no TF32 on a GPU: `exact_float32`), on the device the program is on."""
    with exact_float32():
        return _verify(program, keep, trials, rtol, atol, seed)


def _verify(program: Program, keep: dict[int, np.ndarray], trials: int, rtol: float, atol: float, seed: int) -> dict:
    names = [n for n in compared_nodes(program) if n in _node_names(program.gm)]
    _check_same_ops(program, names)
    reference = _MaskedRecorder(program.original, program.coupling, keep, program.ops, names=names,
                                zeroed=program.removed_outputs(keep))
    compact = _CompactRecorder(program.gm, names=names)
    checks: dict[str, Check] = {}
    previous: dict[str, torch.Tensor] | None = None
    inputs = verification_inputs(program.example_inputs, trials, seed)
    program.gm.eval()
    macs = None
    for i, xs in enumerate(inputs):
        refs, counted = _run_both(reference, compact, xs, program, keep, checks, rtol, atol, record=i == 0)
        macs = counted if i == 0 else macs
        if i == 1 and not _same_inputs(inputs[0], xs):
            _mark_input_independent(checks, previous, refs)
        previous = refs
    labels = tensor_labels(program, names)  # output leaves keep their paths (`output['logits']`)
    for name, check in checks.items():
        check.label = labels.get(name, name)
    report = {**_report(checks), "rtol": rtol, "atol": atol}
    program.report["verify"] = report
    program.report["max_abs_error"] = max((c.max_abs_error for c in checks.values()), default=0.0)
    program.report["max_rel_error"] = max((c.max_rel_error for c in checks.values()), default=0.0)
    _raise_on_failure(checks, report)
    program.shapes_recorded(macs)  # the example input was the first: its run recorded them
    return report


def _node_names(gm: fx.GraphModule) -> set[str]:
    return {n.name for n in gm.graph.nodes}


def _check_same_ops(program: Program, names: list[str]) -> None:
    """Rewrite, fold and dce keep node names; a compared name that now means another op is a pass bug."""
    original = {n.name: n for n in program.original.graph.nodes}
    for n in program.gm.graph.nodes:
        if n.name in names and (n.op, str(n.target)) != (original[n.name].op, str(original[n.name].target)):
            raise VerificationError(f"verification failed: node {n.name!r} is {n.target} in the compact graph but "
                                    f"{original[n.name].target} in the original (a pass renamed nodes); "
                                    "nothing was written")


def _run_both(reference: _MaskedRecorder, compact: _CompactRecorder, xs: tuple, program: Program,
              keep: dict, checks: dict[str, Check], rtol: float, atol: float,
              record: bool = False) -> tuple[dict[str, torch.Tensor], int | None]:
    """One input through both sides; updates `checks`. Returns the references at the kept positions, and
    with `record` the compact run's MACs (its shapes recorded on the way)."""
    reference.values, compact.values = {}, {}
    counter = macs_counter() if record else contextlib.nullcontext()
    compact.recording = record
    with torch.no_grad():
        want_out = reference.run(*xs)
        try:
            with counter:
                got_out = compact.run(*xs)
        except Exception as e:  # a broken rewrite may not even run: that is a failed check, not a crash
            raise VerificationError(f"verification failed: the compact model does not run "
                                    f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                    "nothing was written") from e
        finally:
            compact.recording = False
    want = {n: reference.values[n] for n in reference.names if isinstance(reference.values.get(n), torch.Tensor)}
    got = {n: compact.values.get(n) for n in want}
    types = {n: program.coupling.types.get(n) for n in want}
    want_leaves, got_leaves = dict(tensor_leaves(want_out)), dict(tensor_leaves(got_out))
    producers = _output_producers(program.original)
    for name in [*want_leaves, *(n for n in got_leaves if n not in want_leaves)]:
        want[name], got[name] = want_leaves.get(name), got_leaves.get(name)
        types[name] = program.coupling.types.get(producers[name]) if name in producers else None
    refs = {}
    for name in want:
        check = checks.setdefault(name, Check(name))
        refs[name] = _compare(check, want[name], got[name], types[name], keep, program.coupling.aliases,
                              rtol, atol)
    return refs, counter.get_total_flops() // 2 if record else None


def _output_producers(gm: fx.GraphModule) -> dict[str, str]:
    """Output leaf name -> the node that computes it (its type tells which axes were pruned)."""
    out = next(n for n in gm.graph.nodes if n.op == "output")
    leaves, _ = pytree.tree_flatten_with_path(out.args[0])
    return {"output" + pytree.keystr(path): leaf.name for path, leaf in leaves if isinstance(leaf, fx.Node)}


def _compare(check: Check, want: torch.Tensor | None, got: Any, t: Any, keep: dict, aliases: dict,
             rtol: float, atol: float) -> torch.Tensor | None:
    """Update one check with one input; returns the reference at the kept positions (None: not comparable)."""
    if want is None or not isinstance(got, torch.Tensor):
        check.ok, check.problem = False, "missing on one side (output structures differ)"
        check.max_abs_error = math.inf
        return None
    ref = _gather_kept(want, got.shape, t, keep, aliases)
    if ref is None:
        check.ok, check.problem = False, f"shape {tuple(got.shape)} where {tuple(want.shape)} was masked"
        check.max_abs_error = math.inf
        return None
    err, scale, constant = _difference(ref, got)
    check.max_abs_error = max(check.max_abs_error, err)
    check.scale = max(check.scale, scale)
    check.constant &= constant
    check.ok &= err <= atol + rtol * scale
    return ref


def _difference(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float, bool]:
    """The largest |got - ref|, the largest |ref| and whether ref is constant, in three reductions over
    tensors of at least float32 (exact enough against tolerances of 1e-5; a double copy of every compared
    tensor cost verify a quarter of its time)."""
    if not ref.numel():
        return 0.0, 0.0, True
    dtype = torch.promote_types(ref.dtype, torch.float32) if ref.is_floating_point() else torch.float64
    ref, got = ref.to(dtype), got.to(dtype)
    low, high = (v.item() for v in torch.aminmax(ref))
    err = torch.linalg.vector_norm(got - ref, ord=math.inf).item()
    err = math.inf if math.isnan(err) else err  # NaN on either side is as wrong as it gets
    return err, max(abs(low), abs(high)), low == high


def _gather_kept(want: torch.Tensor, shape: torch.Size, t: Any, keep: dict, aliases: dict) -> torch.Tensor | None:
    """The reference at the kept flat positions of each axis that shrank; None where that cannot be told."""
    if tuple(want.shape) == tuple(shape):
        return want
    if not is_ttype(t) or len(t) != want.dim() or want.dim() != len(shape):
        return None
    for d, (ax, n) in enumerate(zip(t, shape)):
        if want.shape[d] == n:
            continue
        mask = axis_mask(ax, keep, aliases)
        if mask is None or len(mask) != want.shape[d] or int(mask.sum()) != n:
            return None
        want = want.index_select(d, torch.as_tensor(np.flatnonzero(mask), dtype=torch.long, device=want.device))
    return want


def _same_inputs(a: tuple, b: tuple) -> bool:
    return all(x is y or (isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) and torch.equal(x, y))
               for x, y in zip(a, b))


def _mark_input_independent(checks: dict[str, Check], first: dict, second: dict) -> None:
    """A reference identical on two different inputs ignores the input: as vacuous as a constant one."""
    for name, ref in second.items():
        before = first.get(name) if first else None
        if ref is not None and before is not None and ref.shape == before.shape and torch.equal(ref, before):
            checks[name].independent = True


def _report(checks: dict[str, Check]) -> dict:
    """The tensors worst first (ties in graph order); a worst one only where some tensor differs at all."""
    ranked = sorted(checks.values(), key=lambda c: c.badness, reverse=True)
    worst = ranked[0] if ranked and (not ranked[0].ok or ranked[0].max_abs_error > 0) else None
    return {"tensors": [c.to_json() for c in ranked], "worst": worst.to_json()["name"] if worst else None,
            "vacuous": [c.to_json()["name"] for c in checks.values() if c.vacuous]}


def _raise_on_failure(checks: dict[str, Check], report: dict) -> None:
    failed = [c for c in checks.values() if not c.ok]
    if failed:
        c = max(failed, key=lambda c: c.max_rel_error)
        what = c.problem or (f"differs from masked by {c.max_abs_error:.3g} (relative {c.max_rel_error:.3g} "
                             f"of scale {c.scale:.3g})")
        name = c.name if c.label in ("", c.name) else f"{c.label} (node {c.name})"
        raise VerificationError(f"verification failed: {name} {what}; {len(failed)} of {len(checks)} "
                                "tensors off; nothing was written")
    if checks and len(report["vacuous"]) == len(checks):
        raise VerificationError(f"verification is vacuous: all {len(checks)} compared tensors are constant or "
                                "ignore the input, so the compact model could not be checked; nothing was written")
