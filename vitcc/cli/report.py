"""`vitcc report REPORT.json -o OUT.html|OUT.png`: the page (or the picture alone) of a report written earlier.

`--bench BENCH.json` (from `vitcc bench MODEL COMPILED --json`) adds the latencies it measured to the page.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vitcc.cli.app import app
from vitcc.errors import VitccError
from vitcc.cli.outputs import Outputs
from vitcc.report import check_output, read_json, read_report, write


@app.command("report")
def report_cmd(
    report: Path = typer.Argument(..., help="a report.json written by `vitcc compile ... --report report.json`"),
    output: Path = typer.Option(..., "-o", "--output", help="report.html (the page) or report.png (the picture)"),
    bench: Optional[Path] = typer.Option(None, "--bench", help="a `vitcc bench MODEL COMPILED --json` file: adds "
                                         "the latencies it measured"),
) -> None:
    """Draw a compile report written earlier as a self-contained HTML page or a PNG picture."""
    with Outputs([report, bench]) as outputs:
        tmp = outputs.plan(output, "-o")
        check_output(output, "-o", (".html", ".png"))
        rep = read_report(report)
        if bench is not None:
            rep["bench"] = read_json(bench, "--bench")
            if len(rep["bench"].get("sizes", {})) != 2 or not isinstance(rep["bench"].get("runs"), list):
                raise VitccError(f"--bench {bench} is not a `vitcc bench MODEL COMPILED --json` file of two models")
        try:
            write(rep, tmp)
        except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:  # hand-edited, not ours
            raise VitccError(f"report {report} is not a well-formed compile report ({type(e).__name__}: {e}); "
                             "write it again with vitcc compile MODEL --report report.json") from None
