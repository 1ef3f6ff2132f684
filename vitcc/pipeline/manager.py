"""Pass infrastructure: typed pass options, a registry by name, pipeline strings, and an ordered manager.

Users name method passes (``magnitude{p=1}``); the structural passes (analyze, select, rewrite, fold,
dce, verify) are implied in their fixed order and can be named to set options or to anchor a custom
pass (``before``/``after``). Third-party packages register passes in the ``vitcc.passes`` entry-point group.

Options are declared per pass class, as MLIR's declarative pass options are (name, type, default, help):
``options_spec = (Option("p", float, 2, "norm order: 1 or 2"),)``; a pipeline string or a constructor call
naming an undeclared option, or giving a value of the wrong type or outside its choices, is a one-line
VitccError listing the valid options. Names resolve through a `PassRegistry` built per compile (built-ins,
entry points and what `@register_pass` declared), so no compile changes what another one sees.

Analyses of the graph (`ANALYSES`: "shapes", "coupling") are valid or recomputed: a pass that changes
`program.gm` says which analyses it preserved (`PassResult(preserved=...)`; unsaid, the manager compares
the graph before and after), the manager marks the others stale (`program.stale`) and recomputes those a
later pass `needs` before running it (`refresh`). The coupling is only recomputed on a graph that is its
reference's (`program.original`): after rewrite the graph is compact and the coupling stays the analysis
of the original, which the masked reference and verify read.
"""
from __future__ import annotations

import ast
import re
import time
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Callable

import torch
import torch.fx as fx

from vitcc.analysis.refresh import refresh
from vitcc.errors import VitccError, raise_if_signalled
from vitcc.ir.program import ANALYSES, Program
from vitcc.pipeline import pass_base
from vitcc.pipeline.pass_base import STRUCTURAL, Pass, PassResult, options_of

class PassRegistry:
    """Pass names a compile resolves: a private copy, so additions for one compile never leak into another."""

    def __init__(self, passes: dict[str, type[Pass]] | None = None):
        self._passes = dict(passes or {})

    @classmethod
    def default(cls) -> "PassRegistry":
        """A fresh registry: built-in passes, the `vitcc.passes` entry-point group, and `@register_pass` ones."""
        from vitcc import passes  # noqa: F401  (declares the built-ins)
        reg = cls(pass_base._DECLARED)
        for ep in entry_points(group="vitcc.passes"):
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Pass) and ep.name not in reg:
                reg.add(obj, ep.name)
        return reg

    def add(self, cls: type[Pass], name: str | None = None, kind: str | None = None) -> type[Pass]:
        """Make `cls` known to this registry only (by `name`, default its own)."""
        name = name or cls.name
        if not name:
            raise VitccError(f"pass class {cls.__name__} needs a name: add(cls, name='...')")
        if cls.name != name or (kind and cls.kind != kind):  # a subclass keeps the original untouched
            cls = type(cls.__name__, (cls,), {"name": name, "kind": kind or cls.kind})
        self._passes[name] = cls
        return cls

    def __contains__(self, name: str) -> bool:
        return name in self._passes

    def names(self) -> list[str]:
        return sorted(self._passes)

    def get(self, name: str) -> type[Pass]:
        if name not in self._passes:
            raise VitccError(f"unknown pass {name!r}; valid passes: {', '.join(self.names())}")
        return self._passes[name]

    def make(self, name: str, options: dict[str, Any] | None = None) -> Pass:
        return self.get(name)(**(options or {}))


# -- pipeline strings --------------------------------------------------------------------------------

_ITEM = re.compile(r"\s*([A-Za-z_][\w\-]*)\s*(\{[^{}]*\})?\s*(,|$)")


def parse_pipeline(text: str) -> list[tuple[str, dict[str, Any]]]:
    """`magnitude{p=1},select{sparsity=0.5}` -> [("magnitude", {"p": 1}), ("select", {"sparsity": 0.5})]."""
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        m = _ITEM.match(text, pos)
        if not m or m.end() == pos:
            raise VitccError(f"cannot parse pass pipeline {text!r} at {text[pos:]!r}; write e.g. magnitude{{p=1}},lamp")
        opts = {}
        for kv in filter(None, (s.strip() for s in (m.group(2) or "{}")[1:-1].split(";" if ";" in (m.group(2) or "") else ","))):
            if "=" not in kv:
                raise VitccError(f"pass option {kv!r} in {text!r} must be key=value")
            k, v = (s.strip() for s in kv.split("=", 1))
            opts[k] = _literal(v)
        out.append((m.group(1), opts))
        pos = m.end()
    return out


def _literal(v: str) -> Any:
    try:
        return ast.literal_eval(v)
    except Exception:  # not a literal (also: nested too deeply, too large): the option gets the text
        return v


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(repr(p) for p in passes)


def make_pass(name: str, options: dict[str, Any] | None = None, registry: PassRegistry | None = None) -> Pass:
    return (registry or PassRegistry.default()).make(name, options)


@dataclass
class Insertion:
    pass_: Pass
    before: str | None = None
    after: str | None = None


def build_pipeline(spec: str | list[Pass] | None, insert: list[Insertion] | None = None,
                   structural_options: dict[str, dict[str, Any]] | None = None,
                   registry: PassRegistry | None = None) -> list[Pass]:
    """Method passes from `spec` between analyze and select; structural passes in their fixed order.

    Names resolve through `registry` (default: a fresh `PassRegistry.default()` for this call)."""
    registry = registry or PassRegistry.default()
    items = spec if isinstance(spec, list) else parse_pipeline(spec or "magnitude")
    methods: list[Pass] = []
    structural = {name: dict((structural_options or {}).get(name, {})) for name in STRUCTURAL}
    for item in items:
        p = item if isinstance(item, Pass) else None
        name, opts = (p.name, p.options) if p else item
        if name in STRUCTURAL:
            structural[name].update(opts)
            continue
        methods.append(p or registry.make(name, opts))
    passes = [registry.make("analyze", structural["analyze"])] + methods
    passes += [registry.make(n, structural[n]) for n in STRUCTURAL[1:]]
    for ins in insert or []:
        anchor = ins.before or ins.after
        idx = next((i for i, p in enumerate(passes) if p.name == anchor), None)
        if idx is None:
            raise VitccError(f"cannot insert {ins.pass_.name!r}: no pass named {anchor!r} in {format_pipeline(passes)}")
        passes.insert(idx if ins.before else idx + 1, ins.pass_)
    return passes


class PassManager:
    """Runs passes in order, timing each, checking the program between them, and keeping its analyses valid."""

    def __init__(self, passes: list[Pass], on_pass: Callable[[Pass, str], None] | None = None):
        self.passes = passes
        self.on_pass = on_pass

    def run(self, program: Program) -> Program:
        timings = program.report.setdefault("passes", [])
        done: list[str] = []
        changed_by: dict[str, str] = {}  # stale analysis -> the pass that changed the graph
        for p in self.passes:
            raise_if_signalled()
            if self.on_pass:
                self.on_pass(p, "start")
            start = time.perf_counter()
            try:
                if p.writes_weights:
                    program.own_tensors()
                _prepare(program, p, changed_by)
                before = graph_signature(program.gm)
                p.requires(program)
                result = p.run(program) or PassResult()
                p.ensures(program)
                _check(program)
                for name in _invalidated(program, result, before):
                    changed_by[name] = p.name
            except VitccError:
                raise
            except Exception as e:  # a bug in a pass: name it and what ran before it
                raise RuntimeError(f"pass {p.name!r} failed after [{', '.join(done)}]: {e}") from e
            timings.append({"name": p.name, "options": options_of(p),
                            "seconds": round(time.perf_counter() - start, 4), "modified": bool(result.modified)})
            done.append(p.name)
            if self.on_pass:
                self.on_pass(p, "end")
        _finish(program)
        return program


def graph_signature(gm: fx.GraphModule) -> tuple:
    """What the analyses of a graph depend on: its code and the shapes of its tensors (not their values)."""
    tensors = [*gm.named_parameters(remove_duplicate=False), *gm.named_buffers(remove_duplicate=False)]
    return gm.code, tuple((name, tuple(t.shape)) for name, t in tensors)


def _invalidated(program: Program, result: PassResult, before: tuple) -> set[str]:
    """Mark stale what the pass did not preserve; returns the analyses it made stale."""
    preserved = result.preserved
    if preserved is None:
        preserved = ANALYSES if graph_signature(program.gm) == before else frozenset()
    lost = set(ANALYSES - frozenset(preserved)) - program.stale
    program.stale |= lost  # preserving an analysis that was already stale does not make it valid
    return lost


def _prepare(program: Program, p: Pass, changed_by: dict[str, str]) -> None:
    """Recompute the stale analyses `p` needs. The coupling only where the graph is still its reference's
    (a pass that changed the graph before select rebased `program.original`, as lowrank does).

    What a pass declared (`needs`) it gets, or a one-line error; a pass that declared nothing gets what can be
    recomputed, and otherwise the program as it is (after rewrite: `program.coupling`, the original's)."""
    declared = p.needs is not None
    need = p.analyses_needed() & program.stale
    if "coupling" in need and graph_signature(program.gm) != graph_signature(program.original):
        if declared:
            who = changed_by.get("coupling", "a pass")
            raise VitccError(f"pass {p.name!r} needs the channel coupling of the graph, but {who!r} changed the "
                             "graph and program.original is another graph (after rewrite the graph is compact): "
                             f"run {p.name!r} before {who!r}, or rebase program.original in {who!r} if it changed "
                             "the model on purpose")
        need = need - {"coupling"}
    try:
        if need:
            refresh(program, *need)
    except VitccError:
        if declared:
            raise  # else: a graph that does not run is verify's to report


def _finish(program: Program) -> None:
    """The graph handed back owns its tensors and describes itself: shapes (and MACs) recomputed on the
    compact graph, or dropped when it does not run (only possible without verify)."""
    program.own_tensors()
    if "shapes" not in program.stale:
        return
    try:
        refresh(program, "shapes")
    except VitccError:
        for n in program.gm.graph.nodes:
            n.meta.pop("tensor_meta", None)


def _check(program: Program) -> None:
    program.gm.graph.lint()
    for name, t in program.scores.items():
        if isinstance(t, torch.Tensor) and t.device.type != "cpu":
            raise RuntimeError(f"scores of {name} are on {t.device}: scores stay on the CPU, where select ranks "
                               "them (move them with .cpu())")
    names = {g.name for g in program.groups}
    unknown = program.keep.removed - {b.name for b in program.branches if b.prunable}
    if unknown:
        raise RuntimeError(f"selection removes unknown or frozen branch {sorted(unknown)[0]!r}")
    for name, idx in program.keep.items():
        if name not in names:
            raise RuntimeError(f"selection names unknown group {name!r}")
        g = program.group(name)
        if len(idx) and (min(idx) < 0 or max(idx) >= g.size):
            raise RuntimeError(f"selection of {name} out of range")
