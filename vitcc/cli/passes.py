"""`vitcc passes`: every pass a pipeline string can name, with its options (type, default, help)."""
from __future__ import annotations

import json
import sys

import typer
from rich.console import Console

from vitcc.cli.app import app
from vitcc.pipeline.pass_base import Pass
from vitcc.pipeline.manager import PassRegistry


def describe(cls: type[Pass]) -> dict:
    """A pass as data: name, kind, one-line summary and its declared options."""
    doc = cls.__doc__ or sys.modules[cls.__module__].__doc__ or ""
    return {"name": cls.name, "kind": cls.kind, "summary": (doc.strip().splitlines() or [""])[0],
            "options": [{"name": o.name, "type": o.type_name, "default": o.default, "help": o.help}
                        for o in cls.options_spec]}


@app.command("passes")
def passes_cmd(as_json: bool = typer.Option(False, "--json", help="machine-readable output")) -> None:
    """List the passes --passes can name (built-in, plug-ins, registered) with their options."""
    registry = PassRegistry.default()
    info = [describe(registry.get(n)) for n in registry.names()]
    if as_json:
        print(json.dumps(info, indent=2))
        return
    out = Console(highlight=False, soft_wrap=True)
    for kind, title in (("method", "method passes (--passes a,b{opt=value})"),
                        ("structural", "structural passes (fixed order; name them to set options)")):
        out.print(f"[bold]{title}[/bold]")
        for p in (p for p in info if p["kind"] == kind):
            out.print(f"  [bold]{p['name']}[/bold]  {p['summary']}", markup=True)
            for o in p["options"]:
                default = "" if o["default"] is None else f" = {o['default']!r}"
                out.print(f"      {o['name']}: {o['type']}{default}  {o['help']}", markup=False)
