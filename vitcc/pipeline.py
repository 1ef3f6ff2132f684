"""Pass infrastructure: a registry by name, pipeline strings with options, and an ordered manager.

Users name method passes (``magnitude{p=1}``); the structural passes (analyze, select, rewrite, fold,
dce, verify) are implied in their fixed order and can be named to set options or to anchor a custom
pass (``before``/``after``). Third-party packages register passes in the ``vitcc.passes`` entry-point group.
"""
from __future__ import annotations

import ast
import re
import time
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable

from .errors import VitccError
from .ir import Program

STRUCTURAL = ("analyze", "select", "rewrite", "fold", "dce", "verify")


@dataclass
class PassResult:
    modified: bool = True
    info: dict[str, Any] = field(default_factory=dict)


class Pass:
    """Base class: `run` reads and writes the Program; `requires`/`ensures` check it around the run."""
    name: str = ""
    kind: str = "method"  # "structural" passes have a fixed slot; "method" passes score groups

    def __init__(self, **options: Any):
        self.options = options

    def requires(self, program: Program) -> None:
        """Raise if the program is not in a state this pass can run on."""

    def run(self, program: Program) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, program: Program) -> None:
        """Raise if the pass left the program inconsistent."""

    def __repr__(self) -> str:
        return format_pass(self.name, self.options)


REGISTRY: dict[str, type[Pass]] = {}


def register_pass(name: str, kind: str = "method") -> Callable[[type[Pass]], type[Pass]]:
    def deco(cls: type[Pass]) -> type[Pass]:
        cls.name, cls.kind = name, kind
        REGISTRY[name] = cls
        return cls
    return deco


_loaded = False


def load_passes() -> dict[str, type[Pass]]:
    """Built-in passes plus those other packages declare under the `vitcc.passes` entry-point group."""
    global _loaded
    if not _loaded:
        _loaded = True
        from . import passes  # noqa: F401  (registers the built-ins)
        for ep in entry_points(group="vitcc.passes"):
            obj = ep.load()
            if isinstance(obj, type) and issubclass(obj, Pass) and obj.name not in REGISTRY:
                register_pass(ep.name, obj.kind)(obj)
    return REGISTRY


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
    except (ValueError, SyntaxError):
        return v


def format_pass(name: str, options: dict[str, Any]) -> str:
    if not options:
        return name
    return name + "{" + ",".join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in options.items()) + "}"


def format_pipeline(passes: list[Pass]) -> str:
    return ",".join(repr(p) for p in passes)


def make_pass(name: str, options: dict[str, Any] | None = None) -> Pass:
    reg = load_passes()
    if name not in reg:
        raise VitccError(f"unknown pass {name!r}; valid passes: {', '.join(sorted(reg))}")
    return reg[name](**(options or {}))


@dataclass
class Insertion:
    pass_: Pass
    before: str | None = None
    after: str | None = None


def build_pipeline(spec: str | list[Pass] | None, insert: list[Insertion] | None = None,
                   structural_options: dict[str, dict[str, Any]] | None = None) -> list[Pass]:
    """Method passes from `spec` between analyze and select; structural passes in their fixed order."""
    items = spec if isinstance(spec, list) else parse_pipeline(spec or "magnitude")
    methods: list[Pass] = []
    structural = {name: dict((structural_options or {}).get(name, {})) for name in STRUCTURAL}
    for item in items:
        p = item if isinstance(item, Pass) else None
        name, opts = (p.name, p.options) if p else item
        if name in STRUCTURAL:
            structural[name].update(opts)
            continue
        methods.append(p or make_pass(name, opts))
    passes = [make_pass("analyze", structural["analyze"])] + methods
    passes += [make_pass(n, structural[n]) for n in STRUCTURAL[1:]]
    for ins in insert or []:
        anchor = ins.before or ins.after
        idx = next((i for i, p in enumerate(passes) if p.name == anchor), None)
        if idx is None:
            raise VitccError(f"cannot insert {ins.pass_.name!r}: no pass named {anchor!r} in {format_pipeline(passes)}")
        passes.insert(idx if ins.before else idx + 1, ins.pass_)
    return passes


class PassManager:
    """Runs passes in order, timing each and checking the program between them."""

    def __init__(self, passes: list[Pass], on_pass: Callable[[Pass, str], None] | None = None):
        self.passes = passes
        self.on_pass = on_pass

    def run(self, program: Program) -> Program:
        timings = program.report.setdefault("passes", [])
        done: list[str] = []
        for p in self.passes:
            if self.on_pass:
                self.on_pass(p, "start")
            start = time.perf_counter()
            try:
                p.requires(program)
                result = p.run(program)
                p.ensures(program)
                _check(program)
            except VitccError:
                raise
            except Exception as e:  # a bug in a pass: name it and what ran before it
                raise RuntimeError(f"pass {p.name!r} failed after [{', '.join(done)}]: {e}") from e
            timings.append({"name": p.name, "seconds": round(time.perf_counter() - start, 4),
                            "modified": bool(result.modified if result else True)})
            done.append(p.name)
            if self.on_pass:
                self.on_pass(p, "end")
        return program


def _check(program: Program) -> None:
    program.gm.graph.lint()
    names = {g.name for g in program.groups}
    for name, idx in program.keep.items():
        if name not in names:
            raise RuntimeError(f"selection names unknown group {name!r}")
        g = program.group(name)
        if len(idx) and (min(idx) < 0 or max(idx) >= g.size):
            raise RuntimeError(f"selection of {name} out of range")
