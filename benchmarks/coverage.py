"""Coverage sweep (issues 9 and 10): compile one model of every timm architecture family with attention
(listed from timm itself, see benchmarks/coverage_models.py), plus Hugging Face transformers, torchvision and
nn.MultiheadAttention models, at S = 0.3 with the default pipeline, and record per model what vitcc did, side
by side with what Torch-Pruning does on the same model with no model-specific code. Results:
benchmarks/results/coverage.md and coverage.json (the family list: coverage_families.json).

    python benchmarks/coverage.py [--models timm:a,hf:vit,... | --quick] [--no-tp | --tools vitcc,tp]
                                  [--tp-skip a,b] [--jobs 2] [--threads N] [--timeout 240] [--tp-timeout 120]
                                  [--max-rss-gb 8] [--out benchmarks/results/coverage] [--merge] [--render]
                                  [--refresh-families]

--merge updates rows of an existing coverage.json (and lists both commands); --render rewrites the .md
from the .json. A crash in verify is located: the program is captured before verify and the compact
graph, then the masked reference, are run node by node; the first node that raises is recorded.

vitcc status per model:
  full     every group prunable (no group frozen) and report["frozen"] empty
  partial  compiled and verified, but some dimensions frozen (nodes and reasons recorded)
  refused  a clean vitcc.errors.VitccError (not a verification failure), e.g. an untraceable model
  crash    anything else: another exception, a VerificationError (compact != masked: a bug), a timeout
           or a dead worker; type, message and the last traceback frames are recorded

Every (model, tool) pair runs in its own subprocess with a timeout, so a hang or a crash of one model
cannot kill the sweep and its memory is freed. Torch-Pruning: `MagnitudePruner(model, x,
MagnitudeImportance(), pruning_ratio=0.3, ignored_layers=[the classifier])`, defaults otherwise (no
num_heads, no custom pruners), then one `step()` and a forward pass whose output shape must match.
"""
from __future__ import annotations

import argparse
import collections
import datetime
import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

SPARSITY = 0.3
# a quick subset: plain ViT, windowed, spatial-reduction, HF and nn.MultiheadAttention
QUICK = ["timm:deit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224", "timm:pvt_v2_b0", "hf:vit",
         "nn:encoder_vit"]
TP_SKIP: list[str] = []  # models Torch-Pruning is not run on by default
MODELS: list[str] = []  # filled by main() from coverage_models.sweep_models() (timm families + EXTRA)

OUT = Path("benchmarks/results/coverage")
REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------
# workers (run in a subprocess: `python coverage.py --worker vitcc|tp --model SOURCE --result FILE`)
# ---------------------------------------------------------------------------------------------------------
def _build(source: str):
    from coverage_models import build
    return build(source)


def _frames(exc: BaseException, n: int = 4) -> list[str]:
    """The last n frames, preceded by the deepest frame in vitcc's own code (vitcc/, passes/) if not among them."""
    tb = traceback.extract_tb(exc.__traceback__)
    picked = tb[-n:]
    own = [f for f in tb if "/vitcc/" in f.filename or "/passes/" in f.filename or f.filename.startswith("<eval_with")]
    if own and own[-1] not in picked:
        picked = [own[-1], *picked]
    out = []
    for f in picked:
        path = f.filename
        for marker in ("site-packages/", str(REPO) + "/"):
            if marker in path:
                path = path.split(marker, 1)[1]
        out.append(f"{path}:{f.lineno} in {f.name}: {(f.line or '').strip()}")
    return out


def _error(exc: BaseException) -> dict:
    """Type and message of the exception; frames of the innermost cause (the PassManager wraps pass bugs)."""
    inner = exc
    while inner.__cause__ is not None and inner.__cause__ is not inner:
        inner = inner.__cause__
    out = {"type": type(exc).__name__, "message": str(exc).strip()[:2000], "frames": _frames(inner)}
    m = re.match(r"pass '([^']+)' failed", str(exc))
    if m:
        out["pass"] = m.group(1)
    if inner is not exc:
        out["cause_type"] = type(inner).__name__
        out["cause_message"] = str(inner).strip()[:2000]
    return out


def _op_label(node) -> str:
    import torch
    if node.op == "call_module":
        try:
            mod = node.graph.owning_module.get_submodule(node.target)
            return type(mod).__name__
        except Exception:
            return str(node.target)
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if node.op == "call_function":
        t = node.target
        if isinstance(t, torch._ops.OpOverload):
            return f"aten.{t.__name__}" if t.namespace == "aten" else str(t)
        mod = getattr(t, "__module__", "") or ""
        name = getattr(t, "__name__", str(t))
        if mod.startswith("timm."):  # timm notrace functions: keep the defining module, it says what they are
            return f"{mod.rsplit('.', 1)[-1]}.{name}"
        return name
    return node.op


def _where(node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        path = list(stack.values())[-1]
        return path[0] if isinstance(path, tuple) else str(path)
    return ""


_NODE_REF = re.compile(r"[\w.]+ \((call_function|call_method|call_module|get_attr|placeholder|output) ([^)]*)\)")


def normalize_reason(reason: str) -> str:
    """Strip node names so one cause reads the same in every block and model."""
    r = re.sub(r"^no coupling rule for .*", "no coupling rule", reason)  # names a module path or the op
    r = _NODE_REF.sub(lambda m: f"<{m.group(2)}>", r)
    r = re.sub(r"^\w+ \((aten\.[\w.]+)\): ", "", r)  # an aten node's own name and op lead some reasons
    r = re.sub(r"\b\w+ \((aten\.[\w.]+)\)", r"<\1>", r)
    r = re.sub(r"\b(getitem|add|mul|view|reshape|permute|transpose|linear|matmul|cat|roll)_\d+\b", r"\1", r)
    return r


def _short(a) -> str:
    import torch.fx as fx
    if isinstance(a, fx.Node):
        return a.name
    if isinstance(a, (list, tuple)):
        inner = ", ".join(_short(x) for x in a)
        return f"({inner}{',' if len(a) == 1 and isinstance(a, tuple) else ''})" if isinstance(a, tuple) else f"[{inner}]"
    if isinstance(a, slice):
        return ":".join("" if v is None else str(v) for v in (a.start, a.stop)) + ("" if a.step is None else f":{a.step}")
    if a is Ellipsis:
        return "..."
    return repr(a)


def _node_code(node) -> str:
    """The node as one line of code, its argument shapes after it: what the rule saw."""
    from vitcc.ir.types import shape_of
    args = ", ".join([_short(a) for a in node.args] + [f"{k}={_short(v)}" for k, v in node.kwargs.items()])
    shapes = []
    for a in node.all_input_nodes:
        sh = shape_of(a)
        if sh is not None:
            shapes.append(f"{a.name}: {list(sh)}")
    out = shape_of(node)
    code = f"{node.name} = {_op_label(node)}({args})"
    return (code[:300] + "  # " + ", ".join(shapes)[:300] + (f" -> {list(out)}" if out is not None else ""))


def _locate(model, x) -> dict | None:
    """Compile again without verify; run the compact graph, then the masked reference (what verify compares
    against), node by node on the example input: the first node that raises, with its input shapes."""
    import torch
    import vitcc
    from vitcc.reference.masking import masked_reference

    captured = {}

    class Capture(vitcc.Pass):  # grabs the program as verify gets it, whatever fails after
        name = "coverage-capture"
        kind = "structural"

        def run(self, program):
            captured["program"] = program
            return vitcc.PassResult(modified=False)

    try:
        vitcc.compile(model, "magnitude", sparsity=SPARSITY, example_inputs=(x,),
                      insert=[vitcc.Insertion(Capture(), before="verify")])
    except Exception:  # noqa: BLE001 - the failure being located
        pass
    program = captured.get("program")
    if program is None:
        return {"error": "the pipeline failed before verify on this second compile"}

    located: dict = {}

    def watch(interp, graph: str):
        inner = interp.run_node

        def run_node(n):
            try:
                return inner(n)
            except Exception as e:  # noqa: BLE001
                shapes = {a.name: list(interp.env[a].shape) for a in n.all_input_nodes
                          if isinstance(interp.env.get(a), torch.Tensor)}
                params = {}
                if n.op == "call_module":
                    mod = interp.module.get_submodule(n.target)
                    params = {k: list(v.shape) for k, v in [*mod.named_parameters(recurse=False),
                                                             *mod.named_buffers(recurse=False)] if v.dim() > 0}
                if not located:  # fx re-raises with its own message; keep the first failing node here
                    located.update({"graph": graph, "node": n.name, "op": _op_label(n),
                                    "where": _where(n) or (n.target if n.op == "call_module" else ""),
                                    "code": f"{n.name} = {_op_label(n)}(" + ", ".join(
                                        [_short(a) for a in n.args] + [f"{k}={_short(v)}" for k, v in n.kwargs.items()]
                                    )[:300] + ")",
                                    "input_shapes": shapes, "params": params,
                                    "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}",
                                    "frames": _frames(e, 3)})
                raise
        interp.run_node = run_node
        return interp

    try:
        with torch.no_grad():
            watch(torch.fx.Interpreter(program.gm), "compact").run(x)
            watch(masked_reference(program, program.keep_by_root()), "masked reference").run(x)
    except Exception as e:  # noqa: BLE001
        return located or {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {"error": "compact and masked reference both run on the example input (a random input of verify failed)"}


def worker_vitcc(name: str) -> dict:
    import torch
    import vitcc
    from vitcc.errors import VerificationError, VitccError
    from coverage_models import family_of, first_tensor
    row: dict = {"model": name, "tool": "vitcc", "family": family_of(name)}
    model, x, reduced = _build(name)
    row.update(input=list(x.shape), reduced=reduced, params_full=sum(p.numel() for p in model.parameters()))
    start = time.perf_counter()
    try:
        r = vitcc.compile(model, "magnitude", sparsity=SPARSITY, example_inputs=(x,))
    except VerificationError as e:  # compact != masked: a bug, not a refusal
        row.update(status="crash", error=_error(e), seconds=round(time.perf_counter() - start, 2))
        return row
    except VitccError as e:
        row.update(status="refused", error=_error(e), seconds=round(time.perf_counter() - start, 2))
        return row
    except Exception as e:  # noqa: BLE001 - recorded, never hidden
        row.update(status="crash", error=_error(e), seconds=round(time.perf_counter() - start, 2))
        if row["error"].get("pass") == "verify":  # the compact graph does not run: find the node that fails
            row["error"]["node"] = _locate(model, x)
        return row
    row["seconds"] = round(time.perf_counter() - start, 2)
    rep = r.report
    nodes = {n.name: n for n in r.program.original.graph.nodes} if r.program.original is not None else {}
    frozen = []
    for f in rep.get("frozen", []):
        n = nodes.get(f["node"])
        m = _NODE_REF.search(f["reason"])
        op = _op_label(n) if n is not None else (m.group(2) if m else "?")
        frozen.append({"node": f["node"], "op": op, "where": _where(n) if n is not None else "",
                       "reason": f["reason"], "cause": normalize_reason(f["reason"]),
                       "code": _node_code(n) if n is not None else ""})
    frozen_groups = [{"name": g.name, "kind": g.kind, "size": g.size, "reason": g.frozen}
                     for g in r.groups if g.frozen is not None]
    sizes = collections.Counter()
    for g in r.groups:
        sizes["all"] += g.size
        if g.frozen is not None:
            sizes["frozen"] += g.size
    row.update(
        status="full" if not frozen and not frozen_groups else "partial",
        params_before=rep["params_before"], params_after=rep["params_after"],
        macs_before=rep["macs_before"], macs_after=rep["macs_after"],
        max_abs_error=rep.get("max_abs_error"), max_rel_error=rep.get("max_rel_error"),
        verified="verify" in rep,  # the verify pass raises on a mismatch; its report means it passed
        verify_worst=(rep.get("verify") or {}).get("worst"), verify_tensors=len((rep.get("verify") or {}).get("tensors", [])),
        groups=len(r.groups), groups_frozen=len(frozen_groups),
        channels_frozen=f"{sizes['frozen']}/{sizes['all']}", widths=rep.get("widths"),
        frozen=frozen, frozen_groups=frozen_groups,
        passes={p["name"]: p["seconds"] for p in rep.get("passes", [])})
    with torch.no_grad():
        row["output_shape_ok"] = tuple(first_tensor(r.module(x)).shape) == tuple(first_tensor(model(x)).shape)
    return row


def worker_tp(name: str) -> dict:
    import torch
    import torch_pruning as tp
    from coverage_models import classifier, first_tensor
    row: dict = {"model": name, "tool": "tp"}
    model, x, _ = _build(name)
    with torch.no_grad():
        ref = first_tensor(model(x))
    before = sum(p.numel() for p in model.parameters())
    clfs = classifier(model)
    stage = "build"
    start = time.perf_counter()
    try:
        pruner = tp.pruner.MagnitudePruner(model, example_inputs=x, importance=tp.importance.MagnitudeImportance(),
                                           pruning_ratio=SPARSITY, ignored_layers=clfs)
        stage = "step"
        pruner.step()
        stage = "forward"
        with torch.no_grad():
            y = model(x)
        y = first_tensor(y)
        after = sum(p.numel() for p in model.parameters())
        row.update(params_before=before, params_after=after)
        if tuple(y.shape) != tuple(ref.shape):
            row.update(status="error", stage="shape", error={"type": "ShapeMismatch", "frames": [],
                       "message": f"output shape {tuple(y.shape)} != {tuple(ref.shape)}"})
        else:
            row.update(status="ok")
    except Exception as e:  # noqa: BLE001
        row.update(status="error", stage=stage, error=_error(e))
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


# ---------------------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------------------
def _rss_gb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run_one(name: str, tool: str, timeout: float, max_rss_gb: float = 8.0, threads: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "row.json"
        log = Path(tmp) / "log.txt"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", tool, "--model", name,
               "--result", str(result), "--threads", str(threads)]
        start = time.perf_counter()
        with open(log, "w") as fh:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
            rc, peak, killed = None, 0.0, None
            while True:  # poll: a timeout or a worker past the memory limit is killed (2 cores, 23 GB shared)
                try:
                    rc = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    pass
                peak = max(peak, _rss_gb(proc.pid))
                if time.perf_counter() - start > timeout:
                    killed = "timeout"
                elif peak > max_rss_gb:
                    killed = "memory"
                if killed:
                    os.killpg(proc.pid, 9)
                    proc.wait()
                    break
        wall = round(time.perf_counter() - start, 1)
        tail = log.read_text(errors="replace")[-1500:]
        if result.exists():
            row = json.loads(result.read_text())
        elif killed == "memory":
            row = {"model": name, "tool": tool, "status": "crash" if tool == "vitcc" else "error",
                   "stage": "memory", "error": {"type": "MemoryLimit", "frames": [],
                                                "message": f"worker killed: resident memory above {max_rss_gb:g} GB "
                                                           f"after {wall:.0f} s (limit of this sweep)"}}
        elif killed == "timeout":
            row = {"model": name, "tool": tool, "status": "crash" if tool == "vitcc" else "error",
                   "stage": "timeout", "error": {"type": "Timeout", "message": f"no result after {timeout:.0f} s",
                                                 "frames": []}}
        else:
            row = {"model": name, "tool": tool, "status": "crash" if tool == "vitcc" else "error",
                   "stage": "worker", "error": {"type": "WorkerDied", "message": f"worker exit code {rc}",
                                                "frames": tail.strip().splitlines()[-4:]}}
        row["wall"] = wall
        row["peak_rss_gb"] = round(peak, 2)
        return row


def sweep(models: list[str], tools: list[str], timeout: float, jobs: int, tp_skip: set[str], rows: dict,
          max_rss_gb: float = 8.0, tp_timeout: float | None = None, threads: int = 1) -> None:
    tasks = [(m, t) for m in models for t in tools if not (t == "tp" and m in tp_skip)]

    def go(task):
        m, t = task
        row = run_one(m, t, tp_timeout if t == "tp" and tp_timeout else timeout, max_rss_gb, threads)
        rows[(m, t)] = row
        short = row.get("status")
        extra = row.get("error", {}).get("message", "")[:120] if "error" in row else ""
        print(f"[{time.strftime('%H:%M:%S')}] {m:32s} {t:5s} {short:8s} {row.get('wall')}s {extra}", flush=True)
        save(rows)

    with ThreadPoolExecutor(max(1, jobs)) as ex:
        list(ex.map(go, tasks))


META: dict = {}


def save(rows: dict) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    data = {"meta": META, "rows": sorted(rows.values(), key=lambda r: (_order(r["model"]), r["tool"]))}
    tmp = OUT.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(OUT.with_suffix(".json"))


def _order(name: str) -> tuple:
    return (MODELS.index(name), name) if name in MODELS else (len(MODELS), name)


def versions() -> dict:
    import timm
    import torch
    out = {"python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__}
    for pkg in ("vitcc", "torch-pruning"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


# ---------------------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------------------
def _pct(before, after) -> str:
    return f"{100 * (1 - after / before):.1f}%" if before else ""


def _cell(s: str) -> str:
    return s.replace("|", "\\|").replace("\n", " ")


KINDS = (("residual", "res"), ("heads", "heads"), ("head_dim", "hd"), ("mlp", "mlp"))


def _kinds(widths: dict) -> str:
    """Which of the four kinds got pruned: `x` absent (no such group), `=x` present but nothing removed."""
    out = []
    for kind, short in KINDS:
        w = widths.get(kind)
        out.append(f"~~{short}~~" if w is None else (short if w["after"] < w["before"] else f"={short}"))
    return " ".join(out)


def _condense(frozen: list[dict], limit: int = 3) -> str:
    c = collections.Counter((f["op"], f["cause"]) for f in frozen)
    parts = [f"{op}: {cause} ×{n}" for (op, cause), n in c.most_common(limit)]
    if len(c) > limit:
        parts.append(f"+{len(c) - limit} more")
    return "; ".join(parts)


def _first_line(msg: str, n: int = 160) -> str:
    line = msg.strip().splitlines()[0] if msg.strip() else ""
    return line[:n] + ("…" if len(line) > n else "")


def causes(vrows: list[dict], trows: list[dict]) -> list[dict]:
    """Frozen reasons and crash messages aggregated by (op, cause), most frequent (by models) first."""
    agg: dict = {}
    for r in vrows:
        for f in r.get("frozen", []):
            key = ("frozen", f["op"], f["cause"])
            a = agg.setdefault(key, {"kind": "frozen", "op": f["op"], "cause": f["cause"], "models": [], "nodes": 0,
                                     "example": None})
            a["nodes"] += 1
            if r["model"] not in a["models"]:
                a["models"].append(r["model"])
            if a["example"] is None:
                a["example"] = {"model": r["model"], "node": f["node"], "where": f["where"], "reason": f["reason"],
                                "code": f.get("code", "")}
        if r["status"] in ("crash", "refused"):
            e = r["error"]
            site = e["frames"][-1].split(": ")[0] if e.get("frames") else ""
            typ = e.get("cause_type", e["type"])
            msg = re.sub(r"\d+", "N", _first_line(e.get("cause_message", e["message"]), 100))
            where = f"pass {e['pass']}: " if "pass" in e else ""
            loc = e.get("node") or {}
            op = f"{loc['op']} ({loc['graph']})" if "op" in loc else typ
            key = (r["status"], op, typ, msg)
            a = agg.setdefault(key, {"kind": r["status"], "op": op, "cause": where + f"{typ}: " + msg, "site": site,
                                     "models": [], "nodes": 0, "example": None})
            a["models"].append(r["model"])
            a["nodes"] += 1
            if a["example"] is None:
                a["example"] = {"model": r["model"], "message": e["message"][:600], "frames": e.get("frames", []),
                                "node": loc}
    return sorted(agg.values(), key=lambda a: (-len(a["models"]), -a["nodes"], a["kind"], a["op"]))


def aims(v: dict, counts: collections.Counter) -> list[str]:
    """The issue's four aims, each with its figure."""
    done = [r for r in v.values() if r["status"] in ("full", "partial")]
    unverified = [r["model"] for r in done if not r.get("verified")]
    unnamed = [r["model"] for r in done if r["status"] == "partial"
               and not all(f.get("op") and f.get("reason") for f in r["frozen"])
               and not all(g.get("reason") for g in r["frozen_groups"])]
    worst = max((r.get("max_rel_error") or 0.0 for r in done), default=0.0)
    full = counts["full"] / max(1, len(v))
    mark = {True: "met", False: "NOT met"}
    return [f"- no crash: {counts['crash']} crash ({mark[counts['crash'] == 0]})",
            f"- every compiled model verified: {len(done) - len(unverified)} of {len(done)} verified, worst max "
            f"relative error {worst:.1e} ({mark[not unverified]}{': ' + ', '.join(unverified) if unverified else ''})",
            f"- `full` >= 80%: {counts['full']} of {len(v)} = {100 * full:.0f}% ({mark[full >= 0.8]})",
            f"- every partial row names its op and why: {counts['partial'] - len(unnamed)} of {counts['partial']} "
            f"({mark[not unnamed]}{': ' + ', '.join(unnamed) if unnamed else ''})"]


def render(data: dict) -> str:
    meta, rows = data["meta"], data["rows"]
    for r in rows:  # re-derive causes so a change of normalize_reason needs no new sweep
        for f in r.get("frozen", []):
            f["cause"] = normalize_reason(f["reason"])
    v = {r["model"]: r for r in rows if r["tool"] == "vitcc"}
    t = {r["model"]: r for r in rows if r["tool"] == "tp"}
    models = sorted(set(v) | set(t), key=_order)
    counts = collections.Counter(v[m]["status"] for m in models if m in v)
    tp_ok = sum(t[m]["status"] == "ok" for m in t)
    ver = meta.get("versions", {})
    lines = [
        "# Coverage sweep: vitcc vs Torch-Pruning at S = 0.3", "",
        f"**vitcc: {counts['full']} full, {counts['partial']} partial, {counts['refused']} refused, "
        f"{counts['crash']} crash** (of {len(v)} models). Torch-Pruning: {tp_ok} ok of {len(t)} run"
        + (f" (not run on: {', '.join(m for m in models if m not in t)})" if len(t) < len(models) else "") + ".",
        "",
        "## Aims", "",
        *aims(v, counts),
        "",
        "## Setup", "",
        "- command: " + "; ".join(f"`{c}`" for c in meta.get("commands", [])),
        f"- date: {meta.get('date', '')}; wall time of the sweep: {meta.get('wall_minutes', '?')} min",
        "- versions (each tool's, as the last command that ran it had it): " + ", ".join(f"{k} {val}" for k, val in ver.items()),
        f"- machine: {meta.get('machine', '')}, CPU only, fp32, batch 1, input from each model's "
        "`pretrained_cfg['input_size']` (HF: `config.image_size`, torchvision: `image_size`), random weights "
        "(`pretrained=False`, `weights=None`, HF from a config; seed 0)",
        "- models (benchmarks/coverage_models.py): one timm model per architecture family (a module of "
        "`timm.models`) whose models contain attention, listed from timm itself: "
        + meta.get("family_rule", "") + f" {meta.get('families', '?')} families of {meta.get('modules', '?')} "
        "timm modules. Then HF transformers (tests/conftest.py's tiny configs), torchvision vit_b_16 and swin_t, "
        "and two nn.MultiheadAttention ViTs (`nn:mha_vit`: sequence-first MHA with separate q/k/v and no bias; "
        "`nn:encoder_vit`: nn.TransformerEncoder, batch_first, norm_first).",
        "- reduced to fit 2 cores (architecture kept, depth/image size cut; column `reduced`): "
        + (", ".join(f"{m} {r['reduced']}" for m, r in v.items() if r.get("reduced") and m.startswith("timm:"))
           or "none"),
        f"- vitcc: `vitcc.compile(model, 'magnitude', sparsity={SPARSITY}, example_inputs=(x,))` (default pipeline "
        "analyze,magnitude,select,rewrite,fold,dce,verify; all kinds; uniform S per group). `full`: no group "
        "frozen and `report['frozen']` empty; `partial`: verified, some dimensions frozen; `refused`: a "
        "`VitccError`; `crash`: any other exception, a `VerificationError`, a timeout or a dead worker.",
        f"- Torch-Pruning: `tp.pruner.MagnitudePruner(model, example_inputs=x, importance="
        f"tp.importance.MagnitudeImportance(), pruning_ratio={SPARSITY}, ignored_layers=[the classifier])` (timm's `get_classifier()`, else the last nn.Linear), "
        "everything else default (no `num_heads`, no custom pruners, no model-specific code), one `step()`, then "
        "`ok` iff the pruned model runs on x and gives the original output shape. Its output values are not "
        "checked (Torch-Pruning does not claim equivalence to a masked model).",
        f"- each (model, tool) in its own subprocess, timeout {meta.get('timeout', '?')} s"
        + (f" ({meta['tp_timeout']:g} s for Torch-Pruning)" if meta.get("tp_timeout") else "") + ", killed above "
        f"{meta.get('max_rss_gb', 8.0):g} GB resident memory (the machine has 23 GB shared with other work). Times "
        "are wall-clock on 2 CPU cores shared with other work: noisy.",
        "",
        "Columns: `kinds pruned` lists residual/heads/head-dim/MLP: plain = some channels removed, `=x` = groups of "
        "that kind exist but kept everything (frozen, or too few channels to remove 30%), ~~x~~ = no group of that "
        "kind was found (its spaces were frozen or fixed before grouping). `frozen groups` counts groups whose "
        "space is frozen (channels in brackets); frozen spaces that never became groups are not counted there, see "
        "`kinds pruned`.",
        "",
        *[f"- note: {n}" for n in meta.get("notes", [])],
        "",
        "| model | vitcc | params −% | MACs −% | max abs err | max rel err | kinds pruned | frozen groups "
        "(channels) | s | frozen / error (condensed) | TP | TP params −% | TP s | TP error |",
        "|---|---|--:|--:|--:|--:|---|--:|--:|---|---|--:|--:|---|",
    ]
    for m in models:
        r = v.get(m, {})
        tr = t.get(m)
        st = r.get("status", "—")
        if st in ("full", "partial"):
            cells = [_pct(r["params_before"], r["params_after"]), _pct(r["macs_before"], r["macs_after"]),
                     f"{r['max_abs_error']:.1e}", f"{r['max_rel_error']:.1e}", _kinds(r.get("widths") or {}),
                     f"{r['groups_frozen']}/{r['groups']} ({r['channels_frozen']})", f"{r['seconds']}",
                     _cell(_condense(r["frozen"])) or ("" if st == "full" else
                                                       "groups frozen: " + ", ".join(g["name"] for g in r["frozen_groups"][:3]))]
        elif st in ("refused", "crash"):
            e = r["error"]
            loc = e.get("node") or {}
            at = f" — at `{loc['node']}` ({loc['op']}, {loc['graph']})" if "node" in loc else ""
            cells = ["", "", "", "", "", "", f"{r.get('seconds', r.get('wall', ''))}",
                     _cell(f"{e['type']}: {_first_line(e['message'])}{at}")]
        else:
            cells = [""] * 8
        if tr is None:
            tcells = ["not run", "", "", ""]
        elif tr["status"] == "ok":
            tcells = ["ok", _pct(tr["params_before"], tr["params_after"]), f"{tr['seconds']}", ""]
        else:
            e = tr["error"]
            pct = _pct(tr["params_before"], tr["params_after"]) if "params_after" in tr else ""
            tcells = ["error", pct, f"{tr.get('seconds', tr.get('wall', ''))}",
                      _cell(f"[{tr.get('stage')}] {e['type']}: {_first_line(e['message'], 120)}")]
        label = m + (f" ({r['family']})" if r.get("family") and r["family"] != m else "") \
            + (" *reduced*" if r.get("reduced") and m.startswith("timm:") else "")
        lines.append("| " + " | ".join([label, st, *cells, *tcells]) + " |")
    lines += ["", "## Top causes", "",
              "Frozen reasons (node names stripped) and crash/refusal messages, aggregated by op across models, most "
              "models first; `nodes` counts frozen nodes (or failing models). One concrete example each.", ""]
    for i, a in enumerate(causes(list(v.values()), list(t.values())), 1):
        ex = a["example"]
        if a["kind"] == "frozen":
            lines.append(f"{i}. **frozen — `{a['op']}`: {a['cause']}** — {len(a['models'])} models, {a['nodes']} "
                         f"nodes ({', '.join(a['models'])})  ")
            lines.append(f"   e.g. {ex['model']}, node `{ex['node']}`" + (f" in `{ex['where']}`" if ex["where"] else "")
                         + f": {ex['reason']}" + ("  " if ex.get("code") else ""))
            if ex.get("code"):
                lines.append(f"   `{ex['code']}`")
        else:
            lines.append(f"{i}. **{a['kind']} — `{a['op']}`: {a['cause']}** — {len(a['models'])} models "
                         f"({', '.join(a['models'])})  ")
            lines.append(f"   e.g. {ex['model']}: `{_first_line(ex['message'], 400)}`  ")
            loc = ex.get("node") or {}
            if "node" in loc:
                lines.append(f"   fails at node `{loc['node']}` ({loc['op']}" + (f" `{loc['where']}`" if loc.get("where")
                             else "") + f") of the {loc['graph']} graph on the example input; inputs "
                             + ", ".join(f"{k} {v}" for k, v in loc["input_shapes"].items())
                             + ("; params " + ", ".join(f"{k} {v}" for k, v in loc["params"].items()) if loc["params"]
                                else "") + "  ")
                if loc.get("code"):
                    lines.append(f"   `{loc['code']}`  ")
            elif loc.get("error"):
                lines.append(f"   (locating the node: {loc['error']})  ")
            for fr in ex["frames"][-4:]:
                lines.append(f"   `{fr}`  ")
    lines += ["", "## Per model: frozen dimensions", ""]
    for m in models:
        r = v.get(m, {})
        if r.get("status") == "partial":
            lines.append(f"### {m}")
            c = collections.Counter((f["op"], f["cause"]) for f in r["frozen"])
            for (op, cause), n in c.most_common():
                nodes = [f["node"] for f in r["frozen"] if (f["op"], f["cause"]) == (op, cause)]
                lines.append(f"- `{op}` ×{n}: {cause} — nodes: " + ", ".join(f"`{x}`" for x in nodes[:6])
                             + (f", … (+{len(nodes) - 6})" if len(nodes) > 6 else ""))
            kinds = collections.Counter(g["kind"] for g in r["frozen_groups"])
            if kinds:
                lines.append("- frozen groups by kind: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common())
                             + "; e.g. " + ", ".join(f"`{g['name']}`" for g in r["frozen_groups"][:4]))
            lines.append("")
    lines += ["## Torch-Pruning errors", ""]
    for m in models:
        tr = t.get(m)
        if tr is not None and tr["status"] != "ok":
            e = tr["error"]
            lines.append(f"- {m} [{tr.get('stage')}] {e['type']}: {_cell(_first_line(e['message'], 300))}"
                         + (f" (at `{e['frames'][-1]}`)" if e.get("frames") else ""))
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=None, help="comma-separated sources (timm:NAME, hf:KIND, torchvision:NAME, "
                    "nn:NAME; default: one timm model per family with attention, plus the HF/torchvision/nn models)")
    ap.add_argument("--refresh-families", action="store_true", help="list timm's families again (about 3 min)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per worker (default: cores / jobs)")
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    ap.add_argument("--tp-skip", default=",".join(TP_SKIP), help="models on which Torch-Pruning is not run")
    ap.add_argument("--jobs", type=int, default=1, help="models run in parallel (default 1)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per model and tool")
    ap.add_argument("--tp-timeout", type=float, default=120,
                    help="seconds for Torch-Pruning (default 300: it hangs or blows up memory on some models)")
    ap.add_argument("--max-rss-gb", type=float, default=8.0, help="kill a worker above this resident memory")
    ap.add_argument("--tools", default="vitcc,tp", help="which of vitcc,tp to run (default both)")
    ap.add_argument("--merge", action="store_true", help="update rows of an existing coverage.json")
    ap.add_argument("--render", action="store_true", help="only rewrite coverage.md from coverage.json")
    ap.add_argument("--out", default="benchmarks/results/coverage")
    ap.add_argument("--worker", choices=["vitcc", "tp"], help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    global OUT
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    if args.worker:
        row = (worker_vitcc if args.worker == "vitcc" else worker_tp)(args.model)
        Path(args.result).write_text(json.dumps(row, default=str))
        return
    OUT = Path(args.out)
    from coverage_models import families, sweep_models
    MODELS[:] = sweep_models(args.refresh_families)
    fams = families()
    import timm
    META.update(family_rule=fams["rule"].replace("\n", " "), families=len(fams["families"]),
                modules=len(timm.list_modules()))
    if args.render:
        data = json.loads(OUT.with_suffix(".json").read_text())
        data["meta"] = {**META, **data["meta"]}
        OUT.with_suffix(".md").write_text(render(data))
        return
    models = QUICK if args.quick else (args.models.split(",") if args.models else MODELS)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    tools = [t for t in args.tools.split(",") if t in ("vitcc", "tp") and not (args.no_tp and t == "tp")]
    rows: dict = {}
    cmd = "python benchmarks/coverage.py " + " ".join(sys.argv[1:])
    META.update(date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"), commands=[cmd.strip()],
                versions=versions(), timeout=args.timeout,
                machine=f"{platform.machine()}, nproc={os.cpu_count()}, load avg at start "
                        + " / ".join(f"{x:.2f}" for x in os.getloadavg()))
    if args.merge and OUT.with_suffix(".json").exists():
        old = json.loads(OUT.with_suffix(".json").read_text())
        rows = {(r["model"], r["tool"]): r for r in old["rows"]}
        META.update({k: val for k, val in old["meta"].items() if k not in ("commands", "versions")},
                    commands=old["meta"].get("commands", []) + [cmd.strip()])
        META["date"] += f" (merged {datetime.datetime.now().astimezone().isoformat(timespec='seconds')})"
        ran = {k: v for k, v in versions().items() if k != "torch-pruning" or "tp" in tools}
        META["versions"] = {**old["meta"].get("versions", {}), **ran}  # each tool's as the last command that ran it
    start = time.perf_counter()
    META.update(max_rss_gb=args.max_rss_gb, tp_timeout=args.tp_timeout)
    META.update(threads=threads, jobs=args.jobs)
    sweep(models, tools, args.timeout, args.jobs, set(filter(None, args.tp_skip.split(","))), rows, args.max_rss_gb,
          args.tp_timeout, threads)
    minutes = round((time.perf_counter() - start) / 60, 1)
    META["wall_minutes"] = minutes if not args.merge else f"{META.get('wall_minutes', '?')} + {minutes}"
    save(rows)
    OUT.with_suffix(".md").write_text(render({"meta": META, "rows": json.loads(OUT.with_suffix(".json").read_text())["rows"]}))
    print(OUT.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
