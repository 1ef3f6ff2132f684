"""The compile report people look at: one self-contained HTML page, or the picture alone as a PNG.

The page is inline SVG and CSS under a Content-Security-Policy that allows nothing else (no scripts, no
fonts or styles from the network), so it reads the same offline, in any browser and on paper. The picture
is built once as data (`picture`: rows of bars, original and kept widths) and drawn twice, as SVG for the
page and with matplotlib for the PNG (the optional `report` extra), so both show the same numbers. Block
order, stages and each group's block come from the report itself (`report["blocks"]`, written by compile);
`vitcc inspect --html` draws the groups before pruning with the same bars.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Any

from vitcc.errors import VitccError

FORMATS = (".json", ".html", ".png")
PNG_NEEDS = 'matplotlib, which is not installed; install it with pip install -e ".[report]"'
# the picture's columns: key, title, colour (Okabe-Ito: distinct for colour-blind readers and in grey print)
COLUMNS = (("heads", "heads", "#0072B2"), ("qk_dim", "q/k head dim", "#56B4E9"), ("v_dim", "v head dim", "#009E73"),
           ("mlp", "MLP neurons", "#E69F00"), ("rank", "rank dims", "#F0E442"),
           ("residual", "residual width", "#CC79A7"), ("other", "other channels", "#D55E00"))
# weights zeroed inside unchanged shapes (dimap{granularity=weight}), per module family: the bars count weights
WEIGHT_COLUMNS = (("QKV", "QKV weights", "#0072B2"), ("PRJ", "PRJ weights", "#56B4E9"), ("MLP", "MLP weights", "#E69F00"))
KIND_COLOURS = {**{key: colour for key, _, colour in COLUMNS}, "head_dim": "#56B4E9", "branch": "#009E73"}
# what each kind's channels are, in the summary
KIND_LABELS = {"residual": "residual width", "heads": "attention heads", "head_dim": "attention head dims",
               "mlp": "MLP neurons", "rank": "rank dims of low-rank factors", "other": "other channels"}
TRACK, EDGE, FROZEN, INK = "#e4e4e4", "#8a8a8a", "#6e6e6e", "#222222"
REQUIRED = ("groups", "blocks", "passes", "params_before", "params_after", "macs_before", "macs_after")


@dataclass
class Bar:
    """One width: `size` channels originally, `kept` of them kept, drawn against `scale` (the widest of its kind)."""
    size: int = 0
    kept: int = 0
    colour: str = INK
    scale: int = 1
    groups: list[str] = field(default_factory=list)
    frozen: list[str] = field(default_factory=list)  # why, for each frozen group in it
    removed: bool = False  # its residual branch was removed (depth pruning): a gap
    before_pruning: bool = False  # inspect: only the size to show
    weights: bool = False  # it counts weights (`groups` names parameters), not channels

    @property
    def text(self) -> str:
        if self.before_pruning:
            return f"{self.size:,}" + (" frozen" if self.frozen else "")
        return "removed" if self.removed else f"{self.kept:,}/{self.size:,}"


@dataclass
class Row:
    label: str
    bars: dict[str, Bar]
    kind: str = "block"  # the class of its SVG group: "block" (compile), "group" (inspect)
    section: str | None = None  # a heading drawn above it: the first block of a stage, the first group of a kind


# ---------------------------------------------------------------------------------------------- the picture

def column_of(group: dict) -> str | None:
    """The picture's column a group's width goes to; None for groups that are no width (a residual branch)."""
    if group["kind"] == "head_dim":
        return "qk_dim" if group["name"].split("#")[0].endswith("qk_dim") else "v_dim"
    return group["kind"] if group["kind"] in ("heads", "mlp", "rank", "residual", "other") else None


def picture(report: dict) -> tuple[list[Row], list[tuple[str, str, str]]]:
    """Per block in model order, its widths before and after (the stage's residual stream too), and the
    columns that occur; a section heading opens every stage of a hierarchical model."""
    groups = {g["name"]: g for g in report["groups"]}
    removed = set(report.get("removed_branches") or [])
    gone = {n for b in report.get("branches") or [] if b.get("removed") for n in b.get("groups", [])}
    rows = {b["name"]: Row(b["name"] or "(model)", {}) for b in report["blocks"]}
    owned = [(g, g.get("block")) for g in report["groups"] if g["kind"] != "residual"]
    owned += [(groups[b["residual"]], b["name"]) for b in report["blocks"] if b.get("residual") in groups]
    for g, block in owned:
        column = column_of(g)
        if block not in rows or column is None:
            continue
        bar = rows[block].bars.setdefault(column, Bar(colour=KIND_COLOURS[column]))
        bar.size += g["size"]
        bar.kept += len(g.get("kept", range(g["size"])))
        bar.groups.append(g["name"])
        bar.removed |= g["name"] in gone or any(_inside(g, branch) for branch in removed)
        if g.get("frozen"):
            bar.frozen.append(f"{g['name']}: {g['frozen']}")
            bar.colour = FROZEN
    stages = _stage_titles(report)
    for b in report["blocks"]:
        rows[b["name"]].section = stages.pop(b["stage"], None)
    columns = [c for c in COLUMNS if any(c[0] in r.bars for r in rows.values())]
    weights = _weight_bars(report, rows)
    if weights:  # the zeros are inside the weights: widths nothing was removed from say nothing
        columns = [c for c in columns if any(r.bars[c[0]].kept < r.bars[c[0]].size for r in rows.values()
                                             if c[0] in r.bars)] + weights
    for key, _, _ in columns:
        widest = max(r.bars[key].size for r in rows.values() if key in r.bars)
        for r in rows.values():
            if key in r.bars:
                r.bars[key].scale = max(widest, 1)
    return list(rows.values()), columns


def _weight_bars(report: dict, rows: dict[str, Row]) -> list[tuple[str, str, str]]:
    """Per block, the nonzero weights of each module family, where weights were zeroed in place (the
    block of a weight: that of the groups laid on it); the columns that occur."""
    per_weight = (report.get("weight_sparsity") or {}).get("per_weight") or {}
    block_of = {m["param"]: g["block"] for g in report["groups"] if g.get("block") is not None
                for m in g.get("members", [])}
    for name, w in per_weight.items():
        block = block_of.get(name)
        if block not in rows:
            continue
        colour = next(c for key, _, c in WEIGHT_COLUMNS if key == w["family"])
        bar = rows[block].bars.setdefault(w["family"], Bar(colour=colour, weights=True))
        bar.size += w["size"]
        bar.kept += w["size"] - w["zeros"]
        bar.groups.append(name)
    return [c for c in WEIGHT_COLUMNS if any(c[0] in r.bars for r in rows.values())]


def weight_families(report: dict) -> list[tuple[str, int, int]]:
    """(family, weights, zeroed) per module family, where a pass zeroed weights in place."""
    totals: dict[str, list[int]] = {}
    for w in ((report.get("weight_sparsity") or {}).get("per_weight") or {}).values():
        t = totals.setdefault(w["family"], [0, 0])
        t[0] += w["size"]
        t[1] += w["zeros"]
    return [(key, *totals[key]) for key, _, _ in WEIGHT_COLUMNS if key in totals]


def width_rows(report: dict) -> list[tuple[str, int, int]]:
    """(what, before, after) for the summary, in the terminal and on the page: channels per group kind,
    residual branches, and where weights were zeroed in place, the nonzero weights per module family and
    of all parameters (kinds that kept every channel are then left out: the shapes did not change)."""
    zeroed = weight_families(report)
    rows = []
    for kind, w in report.get("widths", {}).items():
        if zeroed and w["after"] == w["before"]:
            continue
        what = "residual branches" if kind == "branch" else f"{KIND_LABELS.get(kind, kind)} ({_groups(w['groups'])})"
        rows.append((what, w["before"], w["after"]))
    rows += [(f"{family} weights, nonzero", size, size - zeros) for family, size, zeros in zeroed]
    if zeroed:
        zeros = sum(z for _, _, z in zeroed)
        rows.append(("parameters, nonzero", report["params_before"], report["params_after"] - zeros))
    return rows


def weight_sparsity_line(report: dict) -> str | None:
    """One sentence on weights zeroed in place, or None where none were."""
    ws = report.get("weight_sparsity")
    if not ws:
        return None
    return (f"weights zeroed in place (shapes unchanged): {ws['of_family_weights']:.1%} of the QKV, PRJ and MLP "
            f"weights, {ws['of_all_parameters']:.1%} of all parameters ({ws['zeros']:,} zeros)")


def made_by(report: dict) -> str:
    """Which vitcc and torch compiled it, and when (reports of older vitcc versions say nothing)."""
    versions = report.get("versions") or {}
    made = ", ".join(f"{k} {v}" for k, v in versions.items())
    return f"{made} on {report['date']}" if made and report.get("date") else made


def _groups(n: int) -> str:
    return f"{n} group{'s' * (n != 1)}"


def _inside(group: dict, branch: str) -> bool:
    """A group lives in a residual branch: named under it, or all its parameters are."""
    under = branch + "."
    return (group["name"] == branch or group["name"].startswith(under) or
            bool(group.get("members")) and all(m["param"].startswith(under) for m in group["members"]))


def _stage_titles(report: dict) -> dict[int, str]:
    """Stage index -> heading, only for models with more than one stage."""
    groups = {g["name"]: g for g in report["groups"]}
    stages: dict[int, list[dict]] = {}
    for b in report["blocks"]:
        stages.setdefault(b["stage"], []).append(b)
    if len(stages) < 2:
        return {}
    titles = {}
    for i, (stage, blocks) in enumerate(stages.items()):
        r = groups.get(blocks[0].get("residual"))
        width = f", residual {len(r.get('kept', range(r['size']))):,}/{r['size']:,}" if r else ""
        titles[stage] = f"stage {i + 1}: {len(blocks)} block{'s' * (len(blocks) != 1)}{width}"
    return titles


def group_rows(groups: list[dict]) -> tuple[list[Row], list[tuple[str, str, str]]]:
    """The groups before pruning for `inspect --html`: one bar per group, by kind, frozen ones grey."""
    rows = []
    for kind in dict.fromkeys(g["kind"] for g in groups):
        of_kind = [g for g in groups if g["kind"] == kind]
        widest = max(g["size"] for g in of_kind)
        for i, g in enumerate(of_kind):
            bar = Bar(g["size"], g["size"], FROZEN if g.get("frozen") else KIND_COLOURS.get(kind, INK), max(widest, 1),
                      [g["name"]], [g["frozen"]] if g.get("frozen") else [], before_pruning=True)
            rows.append(Row(g["name"], {"size": bar}, "group", f"{kind} ({_groups(len(of_kind))})" if i == 0 else None))
    return rows, [("size", "channels", "")]


# --------------------------------------------------------------------------------------------------- SVG

FONT, ROW_H, BAR_H, TRACK_W, PAD = 12, 20, 12, 120, 12
CHAR_W = FONT * 0.62  # monospace advance (0.60 in DejaVu/Liberation Mono, Menlo, Consolas is narrower) + margin


def svg_chart(rows: list[Row], columns: list[tuple[str, str, str]]) -> str:
    """Rows of bars as one SVG: the label left, per column a grey track (original width, scaled to the
    widest of its column) with the kept part coloured over it and `kept/original` in a fixed slot right of
    the track, so numbers line up and never touch a bar. All text is monospace, so widths are known here."""
    label_w = CHAR_W * max(len(r.label) for r in rows) + 2 * PAD
    col_x, x = {}, label_w
    for key, title, _ in columns:
        text_w = CHAR_W * max(len(r.bars[key].text) for r in rows if key in r.bars)
        col_x[key] = x
        x += max(TRACK_W + 8 + text_w, CHAR_W * len(title)) + 2 * PAD
    legend = _legend(rows, columns)
    texts = [r.section for r in rows if r.section] + [text + "xxxxx" for _, text in legend]  # a swatch: 5 chars
    width = max(x, CHAR_W * max(map(len, texts), default=0) + 2 * PAD)
    y = PAD + FONT
    parts = [f'<text x="{col_x[key]:.1f}" y="{y}" class="head">{escape(title)}</text>' for key, title, _ in columns]
    y += 8
    for r in rows:
        if r.section:
            y += 10
            parts.append(f'<text x="{PAD}" y="{y + FONT}" class="section">{escape(r.section)}</text>'
                         f'<line x1="{PAD}" x2="{width - PAD:.1f}" y1="{y + FONT + 5}" y2="{y + FONT + 5}" class="rule"/>')
            y += ROW_H + 4
        bars = "".join(_svg_bar(col_x[k], r.bars[k]) for k, _, _ in columns if k in r.bars)
        parts.append(f'<g class="{r.kind}" data-name="{escape(r.label)}" transform="translate(0,{y})">'
                     f'<text x="{PAD}" y="{FONT - 1}">{escape(r.label)}</text>{bars}</g>')
        y += ROW_H
    y = _svg_legend(parts, y + 14, width, legend)
    style = (f"text{{font:{FONT}px ui-monospace,'DejaVu Sans Mono','Liberation Mono',Menlo,Consolas,monospace;"
             f"fill:{INK}}} .head,.section{{font-weight:bold}} .rule{{stroke:#bbbbbb;stroke-width:1}}")
    return (f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width:.0f} {y + PAD:.0f}" width="{width:.0f}" '
            f'height="{y + PAD:.0f}" role="img"><style>{style}</style>'
            f'<rect width="100%" height="100%" fill="#ffffff"/>' + "".join(parts) + "</svg>")


def _svg_bar(x: float, bar: Bar) -> str:
    full = max(TRACK_W * bar.size / bar.scale, 2.0)
    kept = 0.0 if bar.removed else TRACK_W * bar.kept / bar.scale
    tip = "; ".join(bar.groups + [f"frozen: {f}" for f in bar.frozen])
    what = "weights" if bar.weights else "groups"  # what the bar counts, and what its names name
    return (f'<g class="{"weights" if bar.weights else "bar"}" data-size="{bar.size}" '
            f'data-kept="{0 if bar.removed else bar.kept}" data-removed="{str(bar.removed).lower()}" '
            f'data-{what}="{escape(" ".join(bar.groups))}">'
            f'<title>{escape(tip)}</title>'
            f'<rect class="orig" x="{x:.1f}" y="2" width="{full:.1f}" height="{BAR_H}" {_swatch(bar)}/>'
            f'<rect class="kept" x="{x:.1f}" y="2" width="{kept:.1f}" height="{BAR_H}" fill="{bar.colour}"/>'
            f'<text x="{x + TRACK_W + 8:.1f}" y="{FONT}">{escape(bar.text)}</text></g>')


def _swatch(bar: Bar | None) -> str:
    """The track's look: grey with a thin edge, or a dashed outline for a removed branch (None: the legend's)."""
    if bar is not None and bar.removed:
        return f'fill="none" stroke="{EDGE}" stroke-dasharray="4 3"'
    return f'fill="{TRACK}" stroke="{EDGE}" stroke-width="0.5"'


def _legend(rows: list[Row], columns: list[tuple[str, str, str]]) -> list[tuple[str, str]]:
    """(swatch attributes, text) for what the chart shows: only the marks that occur in it."""
    bars = [b for r in rows for b in r.bars.values()]
    items = [(_swatch(None), "original")] if any(b.kept < b.size for b in bars) else []
    items += [(f'fill="{c}"', f"kept {t}") for k, t, c in columns
              if c and any(k in r.bars and not r.bars[k].frozen for r in rows)]
    items += [(f'fill="{FROZEN}"', "frozen (not prunable)")] if any(b.frozen for b in bars) else []
    items += [(_swatch(Bar(removed=True)), "removed branch")] if any(b.removed for b in bars) else []
    return items


def _svg_legend(parts: list[str], y: float, width: float, items: list[tuple[str, str]]) -> float:
    """Legend items in lines that fit `width`; the y below them."""
    x = PAD
    for attrs, text in items:
        w = 20 + CHAR_W * len(text) + 2 * PAD  # swatch and gap (20) + text + space to the next: < 5 chars more
        if x > PAD and x + w > width:
            x, y = PAD, y + ROW_H
        parts.append(f'<g class="legend"><rect x="{x:.1f}" y="{y}" width="14" height="{BAR_H}" {attrs}/>'
                     f'<text x="{x + 20:.1f}" y="{y + FONT - 1}">{escape(text)}</text></g>')
        x += w
    return y + (ROW_H if items else 0)


# -------------------------------------------------------------------------------------------------- pages

CSP = "default-src 'none'; style-src 'unsafe-inline'"  # nothing loads or runs but the page's own CSS
CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI','DejaVu Sans',sans-serif;color:#222;background:#fff;
 max-width:1180px;margin:24px auto;padding:0 16px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;border-bottom:1px solid #ccc;padding-bottom:2px;margin-top:28px}
table{border-collapse:collapse;margin:6px 0} th,td{padding:3px 10px;border-bottom:1px solid #e6e6e6;text-align:left;
 vertical-align:top} th{background:#f4f4f4} .n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
code,.mono{font-family:ui-monospace,'DejaVu Sans Mono',Menlo,Consolas,monospace;font-size:13px}
.figure{overflow-x:auto} .figure svg{max-width:100%;height:auto} .muted{color:#555} .worst{background:#fff1c2}
.warn{color:#9a3412;font-weight:bold}
@media print{body{margin:0;max-width:none} .figure{overflow:visible} tr,svg{break-inside:avoid} h2{break-after:avoid}}
"""


def _page(title: str, body: str) -> str:
    """A complete page: well-formed XML too, so tests (and tools) can parse it with any XML parser."""
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/>'
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}"/>'
            '<meta name="viewport" content="width=device-width, initial-scale=1"/>'
            f'<title>{escape(title)}</title><style>{CSS}</style></head><body>{body}'
            '<p class="muted">written by vitcc</p></body></html>\n')


NUMERIC, MARKED = ' class="n"', ' class="worst"'


def _table(ident: str, head: list[str], rows: list[list[Any]], numeric: tuple[int, ...] = (),
           marked: set[int] | None = None) -> str:
    """A table of plain values (escaped here); `numeric` columns right-aligned, `marked` rows highlighted."""
    def cells(tag: str, values: list) -> str:
        return "".join(f"<{tag}{NUMERIC if i in numeric else ''}>{escape(str(v))}</{tag}>"
                       for i, v in enumerate(values))
    body = "".join(f"<tr{MARKED if i in (marked or ()) else ''}>{cells('td', r)}</tr>"
                   for i, r in enumerate(rows))
    return f'<table id="{ident}"><thead><tr>{cells("th", head)}</tr></thead><tbody>{body}</tbody></table>'


def _kept(after: float, before: float) -> str:
    return f"{after / before:.1%}" if before else "-"


def accuracy_rows(report: dict) -> list[tuple[str, dict]]:
    """(label, top-1/top-5/n) for the accuracies a compile with --data measured, in the order they were taken."""
    labels = (("accuracy_before", "before pruning"), ("accuracy_pruned", "pruned, before fine-tuning"),
              ("accuracy_after", "after fine-tuning" if "finetune" in report else "after pruning"),
              ("accuracy_ema", "EMA of the weights after fine-tuning"))
    return [(label, report[key]) for key, label in labels if report.get(key)]


def _summary(report: dict) -> list[list[Any]]:
    rows = [[label, f"{report[k + '_before']:,}", f"{report[k + '_after']:,}",
             _kept(report[k + "_after"], report[k + "_before"])] for k, label in (("params", "parameters"),
                                                                                   ("macs", "MACs"))]
    lat = report.get("latency_model")
    if lat:  # --target latency: predicted from the latency table
        m = lat.get("measured", {})
        rows.append([f"latency, predicted by the table ({m.get('device_name', '?')}, {m.get('mode', '?')}, batch "
                     f"{m.get('batch', '?')})",
                     f"{lat['predicted_ms_before']:.3g} ms", f"{lat['predicted_ms_after']:.3g} ms",
                     _kept(lat["predicted_ms_after"], lat["predicted_ms_before"])])
    bench = report.get("bench") or {}
    names = list(bench.get("sizes", {}))
    for run in bench.get("runs", []) if len(names) > 1 else []:  # vitcc bench: measured, model vs compiled
        before, after = (run["stats"][n]["wall"] for n in names[:2])
        rows.append([f"latency, {run['runtime']} batch {run['batch']} (vitcc bench, {bench.get('threads', '?')} "
                     f"thread(s), median)", f"{before:.3g} ms", f"{after:.3g} ms", _kept(after, before)])
    rows += [[what, f"{before:,}", f"{after:,}", _kept(after, before)] for what, before, after in width_rows(report)]
    return rows


def render_html(report: dict) -> str:
    """The compile report as one page: summary, the picture, accuracy, verification, frozen ops, pipeline."""
    rows, columns = picture(report)
    budget = report.get("budget", {})
    facts = [f"model <code>{escape(str(report['model']))}</code>" if report.get("model") else "",
             "input " + " ".join(f"<code>{'x'.join(map(str, s))}</code>" for s in report.get("input_shapes", [])),
             ", ".join(f"{k} {escape(str(v))}" for k, v in budget.items() if v is not None),
             escape(weight_sparsity_line(report) or ""), escape(made_by(report))]
    out = [f"<h1>vitcc compile report</h1><p class=\"muted\">{' · '.join(f for f in facts if f)}</p>",
           "<h2>Summary</h2>", _table("summary", ["", "before", "after", "kept"], _summary(report), (1, 2, 3))]
    if report.get("onnx"):
        o = report["onnx"]
        out.append(f"<p>ONNX: <code>{escape(str(o.get('path')))}</code> checked ({escape(str(o.get('checker')))}), "
                   f"onnxruntime max error {o.get('max_abs_error', 0):.3g}</p>")
    out += ["<h2>What was pruned, block by block</h2>",
            '<p class="muted">Per block in model order: the grey track is the original width, the coloured part '
            "what was kept, both scaled to the widest block of the column; the numbers are kept/original. "
            "Head dims are shared by the heads of a block. A removed residual branch is a dashed gap."
            + (" Weight columns count weights: the coloured part is those left nonzero." if weight_families(report)
               else "") + "</p>",
            f'<div class="figure">{svg_chart(rows, columns)}</div>' if rows else "<p>No blocks found.</p>"]
    loose = [g for g in report["groups"] if g.get("block") is None and g["kind"] != "residual"]
    if loose:
        out += ["<p>Groups outside the blocks:</p>", _table("outside", ["group", "kind", "kept", "frozen"], [
            [g["name"], g["kind"], f"{len(g.get('kept', ())):,}/{g['size']:,}", g.get("frozen") or ""]
            for g in loose], (2,))]
    acc = accuracy_rows(report)
    if acc:
        out += ["<h2>Accuracy</h2>", _table("accuracy", ["", "top-1", "top-5", "images"], [
            [label, f"{a['top1']:.2%}", f"{a['top5']:.2%}", f"{a['n']:,}"] for label, a in acc], (1, 2, 3))]
        if report.get("finetune"):
            f = report["finetune"]
            out.append(f"<p>fine-tuned {f.get('epochs')} epoch(s), lr {f.get('lr')}, "
                       f"{'distilled from the unpruned model' if f.get('distill') else 'no distillation'}</p>")
    out += ["<h2>Verification</h2>", _verification(report), "<h2>Frozen ops</h2>", _frozen(report),
            "<h2>Pipeline</h2>", _pipeline(report)]
    return _page("vitcc compile report", "".join(out))


def _verification(report: dict) -> str:
    v = report.get("verify")
    if not v:
        return '<p class="warn">Not verified: compiled with --no-verify.</p>'
    tensors, vacuous = v.get("tensors", []), set(v.get("vacuous", []))
    worst = {i for i, t in enumerate(tensors) if v.get("worst") is not None and t["name"] == v["worst"]}
    if v.get("worst") is None:
        how = "every one of them matched exactly (error 0)"
    else:
        how = (f"max |compact − masked| = {report.get('max_abs_error', 0):.3g} (relative "
               f"{report.get('max_rel_error', 0):.3g}); worst tensor <code>{escape(str(v['worst']))}</code>")
    line = (f"<p>compact(x) = masked(x) on all {len(tensors)} compared tensors (the output, and inside the model "
            f"the residual stream and each branch's output, named by block): {how}"
            + (f"; {len(vacuous)} constant or input-independent (compared, but proving little)" if vacuous else "")
            + ".</p>")
    tol = (f" A tensor passes when its max abs error ≤ {v['atol']:g} + {v['rtol']:g} × scale."
           if "atol" in v and "rtol" in v else "")
    caption = ('<p class="muted">Worst first. <b>scale</b> is the tensor\'s largest |masked| value at the kept '
               "positions: what its errors are measured against (max rel error = max abs error / scale), so a "
               f"tensor of small values is not judged by an absolute error alone.{tol}</p>")
    return line + caption + _table("verify", ["tensor", "max abs error", "max rel error", "scale", ""], [
        [t["name"], f"{t['max_abs_error']:.3g}", f"{t['max_rel_error']:.3g}", f"{t.get('scale', 0):.3g}",
         "worst" if i in worst else ("vacuous" if t["name"] in vacuous else "")] for i, t in enumerate(tensors)],
        (1, 2, 3), worst)


def _frozen(report: dict) -> str:
    frozen = report.get("frozen", [])
    if not frozen:
        return "<p>None: every op had a rule, nothing was frozen.</p>"
    return _table("frozen", ["node", "op", "reason"], [[f["node"], f.get("op", ""), f["reason"]] for f in frozen])


def _pipeline(report: dict) -> str:
    passes = report.get("passes", [])
    rows = [[p["name"], ", ".join(f"{k}={v}" for k, v in (p.get("options") or {}).items()),
             f"{p['seconds']:.3f} s", "yes" if p.get("modified") else "no"] for p in passes]
    rows.append(["total", "", f"{sum(p['seconds'] for p in passes):.3f} s", ""])
    return (f"<p><code>{escape(str(report.get('pipeline', '')))}</code></p>"
            + _table("pipeline", ["pass", "options", "time", "changed the model"], rows, (2,)))


def render_groups_html(data: dict, model: str) -> str:
    """`vitcc inspect --html`: the groups before any pruning, one bar per group by kind, and what is frozen."""
    rows, columns = group_rows(data["groups"])
    frozen = [g for g in data["groups"] if g.get("frozen")]
    out = [f"<h1>vitcc inspect</h1><p class=\"muted\">groups of <code>{escape(model)}</code> before pruning: "
           f"{len(data['groups'])} groups, {sum(g['frozen'] is None and g['size'] > 1 for g in data['groups'])} prunable</p>",
           f'<div class="figure">{svg_chart(rows, columns)}</div>' if rows else "<p>No groups found.</p>",
           "<h2>Frozen groups</h2>",
           _table("frozen-groups", ["group", "kind", "size", "why"],
                  [[g["name"], g["kind"], f"{g['size']:,}", g["frozen"]] for g in frozen], (2,))
           if frozen else "<p>None: every group can be pruned.</p>",
           "<h2>Frozen ops</h2>", _frozen(data)]
    return _page(f"vitcc inspect {model}", "".join(out))


# ---------------------------------------------------------------------------------------------------- PNG

def _matplotlib(flag: str, path: Path):
    """matplotlib's Figure and Patch (no pyplot: no global figure state), or one line naming the extra."""
    try:
        from matplotlib.figure import Figure
        from matplotlib.patches import Patch
    except ImportError:
        raise VitccError(f"{flag} {path} needs {PNG_NEEDS}") from None
    return Figure, Patch


def write_png(report: dict, path: Path) -> None:
    """The picture alone (papers, slides), drawn with matplotlib from the rows the SVG is drawn from."""
    Figure, Patch = _matplotlib("--report", path)
    rows, columns = picture(report)
    lines = [item for r in rows for item in ([(r.section, None)] if r.section else []) + [(r.label, r)]]
    text_in = {k: 0.07 * max(len(r.bars[k].text) for r in rows if k in r.bars) + 0.1 for k, _, _ in columns}
    track_in = 1.5
    label_in = 0.07 * max(len(label) for label, _ in lines) + 0.3
    fig = Figure(figsize=(label_in + sum(track_in + t for t in text_in.values()), 0.7 + 0.2 * len(lines)),
                 layout="constrained")
    axes = fig.subplots(1, len(columns), sharey=True, squeeze=False,
                        gridspec_kw={"width_ratios": [track_in + text_in[k] for k, _, _ in columns]})[0]
    for ax, (key, title, _) in zip(axes, columns):
        scale = next(r.bars[key].scale for r in rows if key in r.bars)
        for y, (_, r) in enumerate(lines):
            bar = r.bars.get(key) if r is not None else None
            if bar is None:
                continue
            if bar.removed:
                ax.barh(y, bar.size, height=0.7, fill=False, edgecolor=EDGE, linestyle="--", linewidth=0.8)
            else:
                ax.barh(y, bar.size, height=0.7, color=TRACK, edgecolor=EDGE, linewidth=0.4)
                ax.barh(y, bar.kept, height=0.7, color=bar.colour)
            ax.text(scale * 1.04, y, bar.text, va="center", fontsize=7, family="monospace", color=INK)
        ax.set_xlim(0, scale * (track_in + text_in[key]) / track_in)
        ax.set_title(title, fontsize=8, loc="left")
        ax.set_xticks([])
        ax.tick_params(left=False)
        for spine in ax.spines.values():
            spine.set_visible(False)
    axes[0].set_yticks(range(len(lines)), [label for label, _ in lines], fontsize=7, family="monospace")
    for tick, (_, r) in zip(axes[0].get_yticklabels(), lines):
        if r is None:
            tick.set_fontweight("bold")
    axes[0].set_ylim(len(lines) - 0.5, -0.5)
    bars = [b for r in rows for b in r.bars.values()]
    kept = "kept; weights: nonzero" if any(b.weights for b in bars) else "kept"
    handles = [Patch(facecolor=TRACK, edgecolor=EDGE, linewidth=0.4, label=f"original (coloured: {kept})")]
    handles += [Patch(facecolor=FROZEN, label="frozen (not prunable)")] if any(b.frozen for b in bars) else []
    handles += ([Patch(fill=False, edgecolor=EDGE, linestyle="--", label="removed branch")]
                if any(b.removed for b in bars) else [])
    fig.legend(handles=handles, loc="outside lower left", ncols=len(handles), fontsize=7, frameon=False)
    fig.savefig(path, format="png", dpi=200, facecolor="white")


# ----------------------------------------------------------------------------------------- files in, out

def json_default(o: Any) -> Any:
    """What json.dumps cannot write by itself: arrays and tensors as lists, anything else as its str."""
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def check_output(path: Path | None, flag: str, formats: tuple[str, ...] = FORMATS) -> None:
    """Before any work: the suffix names a format this command writes, and a PNG has matplotlib to draw it."""
    if path is None:
        return
    suffix = path.suffix.lower()
    if suffix not in formats:
        names = " or ".join([", ".join(formats[:-1]), formats[-1]] if len(formats) > 1 else formats)
        raise VitccError(f"{flag} {path}: unknown format {suffix or '(no suffix)'}; name a {names} file")
    if suffix == ".png":
        _matplotlib(flag, path)


def write(report: dict, path: Path) -> None:
    """Write the report in the format `path`'s suffix names: .json, .html (the page) or .png (the picture).

    The page is drawn from the report as JSON sees it, so `vitcc report report.json` draws the same page."""
    text = json.dumps(report, indent=2, default=json_default)
    suffix = path.suffix.lower()
    if suffix == ".json":
        path.write_text(text)
    elif suffix == ".html":
        path.write_text(render_html(json.loads(text)), encoding="utf-8")
    elif suffix == ".png":
        write_png(json.loads(text), path)
    else:
        raise VitccError(f"unknown report format {suffix!r}; name a .json, .html or .png file")


def read_json(path: Path, what: str) -> dict:
    """A JSON object from a file, or one line saying what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise VitccError(f"{what} {path} does not exist") from None
    except UnicodeDecodeError:
        raise VitccError(f"{what} {path} is not JSON (not text)") from None
    except json.JSONDecodeError as e:
        raise VitccError(f"{what} {path} is not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, dict):
        raise VitccError(f"{what} {path} is not a JSON object")
    return data


def read_report(path: Path) -> dict:
    """A report.json written by `vitcc compile --report`, checked to have what the page draws."""
    report = read_json(path, "report")
    missing = [k for k in REQUIRED if k not in report]
    if missing:
        raise VitccError(f"{path} is not a vitcc compile report (no {', '.join(missing)}); write one with "
                         "vitcc compile MODEL --report report.json" + (" (a report of this vitcc has blocks)"
                                                                       if missing == ["blocks"] else ""))
    return report
