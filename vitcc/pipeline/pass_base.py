"""What a pass is: the `Pass` base class, its typed options, its result, and the names passes are declared
under. Passes import this module; the manager (vitcc.pipeline.manager), which resolves and runs them, sits
above the passes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from vitcc.errors import VitccError
from vitcc.ir.program import ANALYSES, Program

STRUCTURAL = ("analyze", "select", "rewrite", "fold", "dce", "verify")


@dataclass
class PassResult:
    """What a pass did. `preserved`: the analyses (of `ANALYSES`) still valid for the graph after the pass;
    None (unsaid) means all of them when the pass left the graph as it was, none when it changed it."""
    modified: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    preserved: frozenset[str] | set[str] | None = None


_TYPE_NAMES = {int: "int", float: "float", str: "str", bool: "bool"}


@dataclass(frozen=True)
class Option:
    """One declared pass option. `default=None` means unset: the pass computes it (and None is accepted).
    `check` tells values of the right type that the pass cannot use (the help says which)."""
    name: str
    type: type
    default: Any = None
    help: str = ""
    choices: tuple = ()
    check: Callable[[Any], bool] | None = None

    @property
    def type_name(self) -> str:
        return "|".join(map(str, self.choices)) if self.choices else _TYPE_NAMES.get(self.type, self.type.__name__)

    def describe(self) -> str:
        default = "" if self.default is None else f" = {self.default!r}"
        return f"{self.name}: {self.type_name}{default}"

    def coerce(self, value: Any) -> Any:
        """`value` if it fits this option (ints pass as floats, unchanged, so strings round-trip); else ValueError."""
        if value is None and self.default is None:
            return None
        if self.type is bool and isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        ok = isinstance(value, self.type) and not (isinstance(value, bool) and self.type is not bool)
        if self.type is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok or (self.choices and value not in self.choices) or (self.check and not self.check(value)):
            what = (f"one of {', '.join(map(str, self.choices))}" if self.choices else
                    f"{'an' if self.type_name[0] in 'aeiou' else 'a'} {self.type_name}")
            raise ValueError(f"option {self.name} takes {what}" + (f" ({self.help})" if self.help else "") +
                             f", got {value!r}")
        return value


class Pass:
    """Base class: `run` reads and writes the Program; `requires`/`ensures` check it around the run.

    `options_spec` declares the options a pass reads; `self.options` holds the ones given (checked), and
    `self.option(name)` a given value or the declared default.
    """
    name: str = ""
    kind: str = "method"  # "structural" passes have a fixed slot; "method" passes score groups
    options_spec: tuple[Option, ...] = ()
    # analyses of the graph the pass reads (the manager recomputes stale ones first, or names why it cannot);
    # None: by kind, what can be recomputed of both for a method pass (scores come from groups and types),
    # nothing for a structural one
    needs: frozenset[str] | None = None
    # whether `run` may change tensor values of program.gm in place (training, projections, masks). A pass
    # that only reads them, or replaces tensors by new ones (rewrite's slices), says False and runs on the
    # working copy that still shares its tensors with the reference; before any other pass the manager gives
    # program.gm its own copies (`Program.own_tensors`)
    writes_weights: bool = True

    def __init__(self, **options: Any):
        self.options = check_options(type(self), options)

    def option(self, name: str) -> Any:
        return self.options[name] if name in self.options else _spec(type(self))[name].default

    def requires(self, program: Program) -> None:
        """Raise if the program is not in a state this pass can run on."""

    def run(self, program: Program) -> PassResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def ensures(self, program: Program) -> None:
        """Raise if the pass left the program inconsistent."""

    def __repr__(self) -> str:
        return format_pass(self.name, self.options)

    def analyses_needed(self) -> frozenset[str]:
        if self.needs is not None:
            return frozenset(self.needs)
        return ANALYSES if self.kind == "method" else frozenset()


def _spec(cls: type[Pass]) -> dict[str, Option]:
    return {o.name: o for o in cls.options_spec}


def check_options(cls: type[Pass], options: dict[str, Any]) -> dict[str, Any]:
    """The options, each checked against the declaration of `cls`; else a one-line VitccError listing them."""
    spec, name = _spec(cls), cls.name or cls.__name__
    valid = (f"valid options of {name}: " + "; ".join(o.describe() for o in spec.values())
             if spec else f"{name} takes no options")
    out = {}
    for key, value in options.items():
        if key not in spec:
            raise VitccError(f"unknown option {key!r} in {format_pass(name, options)}; {valid} (see `vitcc passes`)")
        try:
            out[key] = spec[key].coerce(value)
        except ValueError as e:
            raise VitccError(f"{format_pass(name, options)}: {e}; {valid}") from None
    return out


_DECLARED: dict[str, type[Pass]] = {}  # what @register_pass declared in this process; compiles read a copy


def register_pass(name: str, kind: str = "method") -> Callable[[type[Pass]], type[Pass]]:
    """Class decorator: name a pass so pipeline strings find it (in every registry built after this)."""
    def deco(cls: type[Pass]) -> type[Pass]:
        cls.name, cls.kind = name, kind
        _DECLARED[name] = cls
        return cls
    return deco


def options_of(p: Pass) -> dict[str, Any]:
    """What a pass ran with, for the report: the options it was given and the declared defaults (not those
    declared None: the pass computes them, e.g. select's budget from the compile's)."""
    given = getattr(p, "options", None) or {}
    options = {o.name: given.get(o.name, o.default) for o in p.options_spec}
    return {name: value for name, value in options.items() if value is not None}


# -- analyses: valid or recomputed -------------------------------------------------------------------------


def format_pass(name: str, options: dict[str, Any]) -> str:
    if not options:
        return name
    sep = ";" if any(isinstance(v, str) and "," in v for v in options.values()) else ","  # what parse_pipeline reads
    return name + "{" + sep.join(f"{k}={v!r}" if isinstance(v, str) else f"{k}={v}" for k, v in options.items()) + "}"
