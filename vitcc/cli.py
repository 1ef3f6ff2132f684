"""Command line: `vitcc compile`, `vitcc inspect`.

Exit codes: 0 success, 2 bad input or usage (one line, no traceback), 3 verification failed.
Nothing is written unless every step, verification included, succeeded.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import VitccError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="vitcc: structured pruning for vision transformers, with verified equivalence.")
console = Console(stderr=True)
DEFAULT_MODEL = "timm:deit_tiny_patch16_224"


def _load(model: str, weights, arch, trust_pickle, input_shape):
    from .frontend import input_shape_for, load_model
    m = load_model(model, weights=weights, arch=arch, trust_pickle=trust_pickle)
    return m, (torch.randn(input_shape_for(m, input_shape)),)


def _outputs_ok(model: str, *outs: Optional[Path]) -> None:
    src = Path(model).resolve() if not model.startswith("timm:") else None
    for o in outs:
        if o is None:
            continue
        if src is not None and o.resolve() == src:
            raise VitccError(f"output {o} would overwrite the input model; choose another path")
        if not o.parent.exists():
            raise VitccError(f"output folder {o.parent} does not exist; create it first")


@app.command("compile")
def compile_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help="timm:NAME, a torch.save'd module (.pt), or a state dict with --arch"),
    passes: str = typer.Option("magnitude", "--passes", help="method passes, e.g. 'magnitude{p=1}' or 'lamp'"),
    sparsity: float = typer.Option(0.5, "--sparsity", help="fraction to remove, in [0, 1)"),
    prune: str = typer.Option("residual,heads,head_dim,mlp", "--prune", help="group kinds to prune"),
    target: str = typer.Option("channels", "--target", help="channels (per group), params or macs (global)"),
    align: int = typer.Option(1, "--align", help="round kept widths to multiples of N"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write the compact GraphModule here"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="also export, check and run it as ONNX"),
    report: Optional[Path] = typer.Option(None, "--report", help="write a JSON report"),
    weights: Optional[str] = typer.Option(None, "--weights", help="state dict to load into a timm model"),
    arch: Optional[str] = typer.Option(None, "--arch", help="timm:NAME for a state-dict input"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="e.g. 1,3,224,224"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="unpickle classes outside torch/timm/vitcc"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip the equivalence check (not recommended)"),
) -> None:
    """Prune MODEL and write a smaller, verified GraphModule."""
    from . import api
    from .export import export_onnx
    if not 0.0 <= sparsity < 1.0:
        raise VitccError(f"--sparsity must be in [0, 1), got {sparsity}")
    _outputs_ok(model, output, onnx, report)
    m, example = _load(model, weights, arch, trust_pickle, input_shape)
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("tracing", total=None)
        on_pass = lambda p, phase: progress.update(task, description=f"{p.name}") if phase == "start" else None
        result = api.compile(m, passes, sparsity=sparsity, example_inputs=example, prune=prune, target=target,
                             align=align, verify=not no_verify, on_pass=on_pass)
        if onnx is not None:
            progress.update(task, description="onnx export")
            result.report["onnx"] = export_onnx(result.module, example, onnx)
    rep = result.report
    if output is not None:
        api.save(result.module, output)
    if report is not None:
        tmp = report.with_name(report.name + ".tmp")
        tmp.write_text(json.dumps(rep, indent=2, default=_json_default))
        tmp.replace(report)
    _summary(rep, model)


def _json_default(o):
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def _summary(rep: dict, model: str) -> None:
    out = Console()
    t = Table(title=f"vitcc compile {model}", show_header=True)
    t.add_column("")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    t.add_column("kept", justify="right")
    for key, label in (("params", "parameters"), ("macs", "MACs")):
        b, a = rep[f"{key}_before"], rep[f"{key}_after"]
        t.add_row(label, f"{b:,}", f"{a:,}", f"{a / max(b, 1):.1%}")
    for kind, w in rep["widths"].items():
        t.add_row(f"{kind} ({w['groups']} groups)", f"{w['before']:,}", f"{w['after']:,}",
                  f"{w['after'] / max(w['before'], 1):.1%}")
    out.print(t)
    if "max_abs_error" in rep:
        out.print(f"verified: max |compact - masked| = {rep['max_abs_error']:.3g} "
                  f"(relative {rep['max_rel_error']:.3g})")
    if "onnx" in rep:
        out.print(f"onnx: {rep['onnx']['path']} checked, onnxruntime max error {rep['onnx']['max_abs_error']:.3g}")
    out.print("passes: " + ", ".join(f"{p['name']} {p['seconds']:.2f}s" for p in rep["passes"]))
    for f in rep.get("frozen", [])[:10]:
        out.print(f"[yellow]frozen[/yellow] at {f['node']}: {f['reason']}")


@app.command("inspect")
def inspect_cmd(
    model: str = typer.Argument(DEFAULT_MODEL),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    weights: Optional[str] = typer.Option(None, "--weights"),
    arch: Optional[str] = typer.Option(None, "--arch"),
    input_shape: Optional[str] = typer.Option(None, "--input-shape"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
) -> None:
    """Print the coupled groups (kind, size, members) and the frozen dimensions of MODEL."""
    from .frontend import trace
    from .ir import Program
    from .pipeline import make_pass
    m, example = _load(model, weights, arch, trust_pickle, input_shape)
    program = Program(gm=trace(m, example), example_inputs=example)
    make_pass("analyze").run(program)
    data = {"groups": [g.to_json() for g in program.groups], "frozen": program.report["frozen"]}
    if as_json:
        print(json.dumps(data, indent=2))
        return
    out = Console()
    t = Table(title=f"groups of {model}")
    for col in ("name", "kind", "size", "members", "status"):
        t.add_column(col)
    for g in program.groups:
        members = ", ".join(f"{mm.param}[{mm.axis}]" for mm in g.members[:4])
        if len(g.members) > 4:
            members += f", … (+{len(g.members) - 4})"
        t.add_row(g.name, g.kind, str(g.size), members, "frozen: " + g.frozen if g.frozen else "prunable")
    out.print(t)
    for f in data["frozen"]:
        out.print(f"[yellow]frozen[/yellow] at {f['node']}: {f['reason']}")


def _load_commands() -> None:
    import importlib
    import pkgutil

    from . import commands
    for info in pkgutil.iter_modules(commands.__path__):
        importlib.import_module(f"{commands.__name__}.{info.name}")


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: errors become one line on stderr, never a traceback."""
    import click
    _load_commands()
    try:
        app(args=argv, standalone_mode=False)
        return 0
    except VitccError as e:
        console.print(f"vitcc: error: {e}", markup=False, highlight=False, soft_wrap=True)
        return e.exit_code
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.exceptions.ClickException as e:
        console.print(f"vitcc: error: {e.format_message()}", markup=False, highlight=False, soft_wrap=True)
        return 2
    except (click.exceptions.Abort, KeyboardInterrupt):
        return 130


def main() -> None:
    sys.exit(run())


if __name__ == "__main__":
    main()
