"""`vitcc compile` and `vitcc inspect`, and what the other commands share (vitcc/cli/*.py: one file each).

Exit codes: 0 success, 2 bad input or usage (one line, no traceback), 3 verification failed, 1 vitcc's own
bug (one line saying where to report it; VITCC_DEBUG=1 adds the traceback), 128 + the signal's number when a
signal ended it (130 Ctrl-C, 143 SIGTERM). Every output path is checked before any work, and nothing is written
unless every step, verification included, succeeded.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch
import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from vitcc.devices import DEVICE_HELP, failure_as_line, memory_hint, resolve_device, to_device
from vitcc.errors import VitccError, first_line
from vitcc.cli.outputs import Outputs, check_folder
from vitcc.report import accuracy_rows, check_output, weight_sparsity_line, width_rows
from vitcc.report import write as write_report

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="vitcc: structured pruning for vision transformers, with verified equivalence.")
console = Console(stderr=True)
DEFAULT_MODEL = "timm:deit_tiny_patch16_224"
MODEL_HELP = ("timm:NAME, torchvision:NAME, hf:DIR (save_pretrained folder), py:MODULE:CALLABLE or py:FILE.py:CALLABLE, "
              "an ExportedProgram (.pt2), a torch.save'd module (.pt), or a state dict with --arch")
WEIGHTS_HELP = "state dict or safetensors to load into a timm:, torchvision:, hf: or py: model"
ARCH_HELP = "the model a state-dict input belongs to: timm:NAME, torchvision:NAME, hf:DIR or py:MODULE:CALLABLE"
# Kept widths rounded to multiples of 16: unaligned widths run up to 1.5x slower per FLOP in MKL's GEMMs, and
# onnxruntime at batch 32 needs 16 where eager PyTorch is content with 8 (benchmarks/results/latency.md).
DEFAULT_ALIGN = 16
TARGETS = ("channels", "params", "macs", "latency")


def _version(show: bool) -> None:
    if show:
        from vitcc.version import installed_version
        print(f"vitcc {installed_version()} (torch {torch.__version__})")
        raise typer.Exit()


@app.callback()
def _options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                          help="print vitcc's and torch's versions and exit")) -> None:
    pass


def _load(model: str, weights, arch, trust_pickle, input_shape, device: torch.device | None = None):
    """The model and one example input on `device` (default: the CPU), checked to run: a shape the model cannot
    take is one line, here."""
    from vitcc.frontend.input_shapes import input_shape_for
    from vitcc.frontend.sources import load_model
    m = load_model(model, weights=weights, arch=arch, trust_pickle=trust_pickle)
    example = (torch.randn(input_shape_for(m, input_shape)),)
    if device is not None and device.type != "cpu":
        to_device(m, device)
        example = tuple(x.to(device) for x in example)
    _check_runs(m, example, input_shape)
    return m, example


def _check_runs(m: torch.nn.Module, example: tuple, given: Optional[str]) -> None:
    from vitcc.frontend.input_shapes import input_shape_for

    def why(e: BaseException) -> str:
        try:
            hint = f"; it takes e.g. --input-shape {','.join(map(str, input_shape_for(m)))}"
        except VitccError:
            hint = "; pass --input-shape with the shape it takes"
        origin = "--input-shape" if given is not None else "the input shape it declares,"
        shape = ",".join(map(str, example[0].shape))
        return f"{type(m).__name__} cannot run on {origin} {shape}: {first_line(e).rstrip('.')}{hint}"
    with failure_as_line(why), torch.no_grad():
        m.eval()(*example)


def check_budget(sparsity: Optional[float], align: int, target: str, passes: Optional[str]) -> None:
    """What compile and bench --sparsity share: checked before a model is loaded."""
    from vitcc.pipeline.manager import build_pipeline
    if sparsity is not None and not 0.0 <= sparsity < 1.0:
        raise VitccError(f"--sparsity must be in [0, 1), got {sparsity}")
    if align < 1:
        raise VitccError(f"--align must be >= 1 (1: no rounding, 16: CPU GEMM-friendly widths), got {align}")
    if target not in TARGETS:
        raise VitccError(f"unknown --target {target!r}; use {', '.join(TARGETS)}")
    if passes is not None:
        build_pipeline(passes)  # unknown passes and options fail now, not after tracing


def check_threads(threads: Optional[int], target: Optional[str] = None, option: str = "--threads") -> None:
    """A thread count is a whole number >= 1; with compile it only means something for --target latency."""
    if threads is None:
        return
    if threads < 1:
        raise VitccError(f"{option} must be >= 1 (this machine has {os.cpu_count()} CPUs), got {threads}")
    if target is not None and target != "latency":
        raise VitccError(f"{option} is the thread count --target latency times ops at; add --target latency "
                         f"(the target is {target})")


@app.command("compile")
def compile_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    passes: str = typer.Option("magnitude", "--passes", help="method passes, e.g. 'magnitude{p=1}' or 'lamp' "
                               "(`vitcc passes` lists them with their options)"),
    sparsity: float = typer.Option(0.5, "--sparsity", help="fraction to remove, in [0, 1)"),
    prune: Optional[str] = typer.Option(None, "--prune", help="group kinds to prune (default: residual,heads,"
                                        "head_dim,mlp,rank, or the kinds the method passes were designed for); "
                                        "branch: remove whole residual branches (attention, MLP: depth pruning)"),
    target: str = typer.Option("channels", "--target", help="channels (per group), params, macs or latency "
                                 "(global; latency: a latency table measured on --device, or --latency-table; see "
                                 "`vitcc profile`)"),
    align: int = typer.Option(DEFAULT_ALIGN, "--align", help="round kept widths to multiples of N (unaligned widths "
                              "run up to 1.5x slower per FLOP on CPU; benchmarks/results/latency.md)"),
    threads: Optional[int] = typer.Option(None, "--threads", help="with --target latency: the intra-op thread "
                                          "count the model will run with, which its table is measured at (one "
                                          "table per count; default: torch's)"),
    latency_table: Optional[Path] = typer.Option(None, "--latency-table", help="with --target latency: select "
                                                 "against this table (`vitcc profile MODEL -o TABLE.json` on the "
                                                 "device) instead of measuring here (without one: a table measured on --device "
                                                 "in eager fp32, once, then read from the cache)"),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="write the compact program here: a .pt2 "
                                          "file (torch.export archive; torch.export.load or vitcc.load reads it)"),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="also export, check and run it as ONNX (a .onnx file)"),
    report: Optional[Path] = typer.Option(None, "--report", help="write the report: R.json (figures), R.html (a page "
                                          "with the picture of what was pruned) or R.png (the picture alone)"),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape", help="e.g. 1,3,224,224"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle", help="unpickle classes outside torch/timm/vitcc"),
    no_verify: bool = typer.Option(False, "--no-verify", help="skip the equivalence check (not recommended)"),
    data: Optional[str] = typer.Option(None, "--data", help="image folder with train/ and val/, or mnist5k or digits"),
    finetune_epochs: int = typer.Option(0, "--finetune-epochs", help="fine-tune the compact model N epochs (needs --data)"),
    lr: float = typer.Option(5e-4, "--lr", help="fine-tuning learning rate (AdamW, cosine schedule)"),
    batch_size: int = typer.Option(64, "--batch-size", help="batch size for fine-tuning and evaluation"),
    seed: int = typer.Option(0, "--seed", help="random init, data order and training: same seed, same result"),
    no_distill: bool = typer.Option(False, "--no-distill", help="fine-tune without distilling from the unpruned model"),
    sparsity_epochs: Optional[int] = typer.Option(None, "--sparsity-epochs", help="epochs of the sparsity-training "
                                                  "phase of gohsp (stage 2, default 0) and vtp (gates, default 1); "
                                                  "needs --data"),
    mean: Optional[str] = typer.Option(None, "--mean", help="normalisation mean, e.g. 0.5,0.5,0.5 (default: the model's)"),
    std: Optional[str] = typer.Option(None, "--std", help="normalisation std, e.g. 0.5,0.5,0.5 (default: the model's)"),
    checkpoint_dir: Optional[Path] = typer.Option(None, "--checkpoint-dir", help="write a checkpoint every epoch here"),
    device: str = typer.Option("cpu", "--device", help=DEVICE_HELP + "; the model, inputs, every pass and "
                               "fine-tuning run there"),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, bf16 or fp16 autocast for training "
                                            "(default: bf16 on a GPU that has it, else fp32); verify stays fp32"),
    aa: Optional[str] = typer.Option(None, "--aa", help="RandAugment policy for fine-tuning, e.g. rand-m9-mstd0.5-inc1 "
                                     "(timm's training transform: crop, flip, RandAugment)"),
    reprob: float = typer.Option(0.0, "--reprob", help="random erasing probability (e.g. 0.25)"),
    mixup: float = typer.Option(0.0, "--mixup", help="mixup alpha (e.g. 0.8; 0: off)"),
    cutmix: float = typer.Option(0.0, "--cutmix", help="cutmix alpha (e.g. 1.0; 0: off)"),
    smoothing: float = typer.Option(0.0, "--smoothing", help="label smoothing (e.g. 0.1)"),
    warmup_epochs: float = typer.Option(0.0, "--warmup-epochs", help="linear learning-rate warmup before the cosine"),
    ema: Optional[float] = typer.Option(None, "--ema", help="keep an EMA of the weights with this decay (e.g. 0.9998); "
                                        "evaluated, and checkpointed as DIR/epochNNN_ema.pt"),
    drop_path: float = typer.Option(0.0, "--drop-path", help="stochastic depth on the compact model's residual "
                                    "branches in training, 0 at the first branch to P at the last (e.g. 0.1)"),
    num_classes: Optional[int] = typer.Option(None, "--num-classes", help="a new classifier with N classes on the "
                                              "compact model before fine-tuning (data with other classes)"),
    workers: int = typer.Option(0, "--workers", help="data-loading worker processes"),
) -> None:
    """Prune MODEL and write a smaller, verified GraphModule (optionally fine-tuned on --data)."""
    args = SimpleNamespace(**locals())
    args.device, args.precision, args.recipe = check_training(args)
    check_budget(sparsity, align, target, passes)
    check_threads(threads, target)
    if latency_table is not None and target != "latency":
        raise VitccError(f"--latency-table is what --target latency selects against; add --target latency (the "
                         f"target is {target})")
    if latency_table is not None:
        from vitcc.search.latency_table import read_table
        read_table(latency_table)  # a file that is no table fails now, before the model is loaded
    if finetune_epochs < 0:
        raise VitccError(f"--finetune-epochs must be >= 0, got {finetune_epochs}")
    if finetune_epochs > 0 and data is None:
        raise VitccError("--finetune-epochs needs --data (an image folder with train/ and val/, mnist5k or digits)")
    if sparsity_epochs is not None and sparsity_epochs < 0:
        raise VitccError(f"--sparsity-epochs must be >= 0, got {sparsity_epochs}")
    if sparsity_epochs and data is None:
        raise VitccError("--sparsity-epochs needs --data (an image folder with train/ and val/, mnist5k or digits)")
    check_folder(checkpoint_dir, "--checkpoint-dir")
    from vitcc.api import PROGRAM_SUFFIX
    with Outputs([model, weights]) as outputs:
        files = {"model": outputs.plan(output, "-o", (PROGRAM_SUFFIX,)),
                 "onnx": outputs.plan(onnx, "--onnx", (".onnx",)),
                 "report": outputs.plan(report, "--report")}
        check_output(report, "--report")
        with memory_hint("--input-shape's batch (verify runs the model and its masked reference) or "
                         "--batch-size (with --data)"):
            rep = _compile(args, files)
        if rep is None:  # not rank 0 under torchrun: rank 0 writes
            outputs.discard()
    if rep is not None:
        _summary(rep, model)


def _compile(a: SimpleNamespace, files: dict[str, Optional[Path]]) -> Optional[dict]:
    """Compile with the command's arguments `a`, export and write to the temporaries in `files`; the report,
    or None on ranks other than 0."""
    from vitcc import api
    from vitcc.training.distributed import init_distributed, is_main
    from vitcc.deploy.export import export_onnx
    init_distributed(device=a.device)  # under torchrun: one process group for training; rank 0 prints, writes
    torch.manual_seed(a.seed)  # a timm: model's random init is the same on every rank and every run
    m, example = _load(a.model, a.weights, a.arch, a.trust_pickle, a.input_shape, a.device)
    loaders = _loaders(m, example, a.data, a.batch_size, a.mean, a.std, a.seed, a.recipe, a.workers,
                       a.device) if a.data is not None else None
    last = "dce" if a.no_verify else "verify"
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True, disable=not (console.is_terminal and is_main())) as progress:
        measures_table = a.target == "latency" and a.latency_table is None  # unless the cache holds it
        task = progress.add_task("tracing, then the latency table" if measures_table else "tracing", total=None)

        def on_pass(p, phase):
            if phase == "start":
                progress.update(task, description=f"{p.name}")
            elif p.name == last and a.finetune_epochs > 0:
                progress.stop()  # fine-tuning shows its own progress bar
        result = api.compile(m, a.passes, sparsity=a.sparsity, example_inputs=example, prune=a.prune, target=a.target,
                             align=a.align, verify=not a.no_verify, on_pass=on_pass, data=loaders,
                             on_progress=lambda step: progress.update(task, description=f"latency table: {step}"),
                             finetune_epochs=a.finetune_epochs, lr=a.lr, distill=not a.no_distill, seed=a.seed,
                             batch_size=a.batch_size, checkpoint_dir=a.checkpoint_dir, progress=console,
                             sparsity_epochs=a.sparsity_epochs, threads=a.threads,
                             latency_table=a.latency_table, device=a.device, precision=a.precision,
                             recipe=a.recipe, num_classes=a.num_classes)
        if a.onnx is not None and is_main():
            progress.update(task, description="onnx export")
            result.report["onnx"] = {**export_onnx(result.module, example, files["onnx"]),
                                     "path": str(a.onnx)}
    if not is_main():
        return None
    rep = result.report
    rep["model"] = a.model
    if files["model"] is not None:
        api.save(result.module, files["model"])
    if files["report"] is not None:
        write_report(rep, files["report"])
    return rep


def _floats(text: Optional[str], name: str):
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(","))
    except ValueError:
        raise VitccError(f"{name} takes comma-separated numbers like 0.5,0.5,0.5, got {text!r}") from None


def _loaders(m, example, data: str, batch_size: int, mean: Optional[str], std: Optional[str], seed: int,
             recipe=None, workers: int = 0, device: Optional[torch.device] = None):
    """(train, val) for --data, shaped like the model input, normalised like the model unless --mean/--std."""
    from vitcc.training.data import make_loaders, normalization_for
    model_mean, model_std = normalization_for(m)
    mean_v, std_v = _floats(mean, "--mean"), _floats(std, "--std")
    return make_loaders(data, tuple(example[0].shape[1:]), batch_size=batch_size,
                        mean=model_mean if mean_v is None else mean_v, std=model_std if std_v is None else std_v,
                        seed=seed, distributed=True, recipe=recipe, num_workers=workers,
                        pin_memory=device is not None and device.type == "cuda")


def check_training(a: SimpleNamespace):
    """compile's training options, checked before any work: (device, precision, Recipe)."""
    from vitcc.training.recipe import Recipe, resolve_precision
    device = resolve_device(a.device)
    precision = resolve_precision(a.precision, device) if a.precision is not None else None
    recipe = Recipe(aa=a.aa, reprob=a.reprob, mixup=a.mixup, cutmix=a.cutmix, smoothing=a.smoothing,
                    warmup_epochs=a.warmup_epochs, ema=a.ema, drop_path=a.drop_path)
    asked = [f"--{k.replace('_', '-')}" for k, v in recipe.to_json().items() if v != getattr(Recipe(), k)]
    if a.num_classes is not None:
        asked.append("--num-classes")
    if asked and a.finetune_epochs <= 0:
        raise VitccError(f"{', '.join(asked)} {'apply' if len(asked) > 1 else 'applies'} to fine-tuning; add "
                         "--finetune-epochs N (and --data)")
    if a.num_classes is not None and a.num_classes < 1:
        raise VitccError(f"--num-classes must be >= 1, got {a.num_classes}")
    if a.workers < 0:
        raise VitccError(f"--workers must be >= 0, got {a.workers}")
    return device, precision, recipe


def _accuracy_lines(rep: dict) -> list[str]:
    return [f"accuracy {label}: top-1 {a['top1']:.2%}, top-5 {a['top5']:.2%} ({a['n']:,} images)"
            for label, a in accuracy_rows(rep)]


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
    for what, before, after in width_rows(rep):
        t.add_row(what, f"{before:,}", f"{after:,}", f"{after / max(before, 1):.1%}")
    out.print(t)
    lm = rep.get("latency_model") or {}
    if "table" in lm:
        m = lm["measured"]
        out.print(f"latency table: {lm['table']} ({m['device_name']}, {m['dtype']}, batch {m['batch']}, {m['mode']}): "
                  f"predicted {lm['predicted_ms_before']:.3f} -> {lm['predicted_ms_after']:.3f} ms "
                  f"({lm['predicted_reduction']:.1%} less)", highlight=False)
    if weight_sparsity_line(rep):
        out.print(weight_sparsity_line(rep), highlight=False)
    if rep.get("removed_branches"):
        out.print(f"removed branches: {', '.join(rep['removed_branches'])}", highlight=False)
    if "max_abs_error" in rep:
        worst = (rep.get("verify") or {}).get("worst")
        out.print(f"verified: max |compact - masked| = {rep['max_abs_error']:.3g} (relative "
                  f"{rep['max_rel_error']:.3g}" + (f", worst: {worst})" if worst else ", every tensor exact)"),
                  highlight=False)
    if "onnx" in rep:
        o = rep["onnx"]
        batch = "dynamic batch" if o["dynamic_batch"] else "fixed batch"
        out.print(f"onnx: {o['path']} ({', '.join(o['inputs'])} -> {', '.join(o['outputs'])}, {batch}, opset "
                  f"{o['opset']}) checked, onnxruntime max error {o['max_abs_error']:.3g}", highlight=False)
    out.print("passes: " + ", ".join(f"{p['name']} {p['seconds']:.2f}s" for p in rep["passes"]))
    for line in _accuracy_lines(rep):
        out.print(line, highlight=False)
    if rep.get("accuracy_skipped"):
        out.print(f"accuracy: not measured: {rep['accuracy_skipped']}", highlight=False)
    for f in rep.get("frozen", [])[:10]:
        out.print(f"[yellow]frozen[/yellow] at {f['node']}: {f['reason']}")


@app.command("inspect")
def inspect_cmd(
    model: str = typer.Argument(DEFAULT_MODEL, help=MODEL_HELP),
    as_json: bool = typer.Option(False, "--json", help="machine-readable output"),
    html: Optional[Path] = typer.Option(None, "--html", help="also write a page drawing the groups (one bar per "
                                        "group, by kind, frozen ones with the reason) to this .html file"),
    weights: Optional[str] = typer.Option(None, "--weights", help=WEIGHTS_HELP),
    arch: Optional[str] = typer.Option(None, "--arch", help=ARCH_HELP),
    input_shape: Optional[str] = typer.Option(None, "--input-shape"),
    trust_pickle: bool = typer.Option(False, "--trust-pickle"),
) -> None:
    """Print the coupled groups (kind, size, members), the residual branches (`--prune branch` removes them
    whole) and the frozen dimensions of MODEL."""
    from vitcc.frontend.capture import capture
    from vitcc.ir.program import Program
    from vitcc.pipeline.manager import make_pass
    from vitcc.report import render_groups_html
    with Outputs([model, weights]) as outputs:
        page = outputs.plan(html, "--html")
        check_output(html, "--html", (".html",))
        m, example = _load(model, weights, arch, trust_pickle, input_shape)
        program = Program(gm=capture(m, example), example_inputs=example)
        make_pass("analyze").run(program)
        tensors = dict(program.gm.named_parameters())
        data = {"groups": [g.to_json() for g in program.groups],
                "branches": [{**b.to_json(), "param_elements": sum(tensors[p].numel() for p in b.params if p in tensors)}
                             for b in program.branches], "frozen": program.report["frozen"]}
        if page is not None:
            page.write_text(render_groups_html(data, model), encoding="utf-8")
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
    if program.branches:
        t = Table(title=f"residual branches of {model} (--prune branch removes them whole)")
        for col in ("name", "role", "ops", "parameters (elements)", "groups", "status"):
            t.add_column(col, justify="right" if col.startswith("parameters") else "left")
        for b, d in zip(program.branches, data["branches"]):
            t.add_row(b.name, b.role, str(b.ops), f"{d['param_elements']:,}", ", ".join(b.groups),
                      "frozen: " + b.frozen if b.frozen else "removable")
        out.print(t)
    for f in data["frozen"]:
        out.print(f"[yellow]frozen[/yellow] at {f['node']}: {f['reason']}")
