"""The Python API: compile a model into a smaller verified GraphModule, and load one back."""
from __future__ import annotations

import copy

from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.fx as fx
from torch.utils.data import DataLoader

from vitcc.devices import device_of, moved_copy, resolve_device, to_device
from vitcc.errors import VitccError
from vitcc.frontend.capture import capture, export_program, source_meta
from vitcc.analysis.groups import model_blocks
from vitcc.ir.groups import Group
from vitcc.ir.program import Program, working_copy, writes_in_place
from vitcc.ir.selection import Selection
from vitcc.metrics import count_graph_macs, count_params
from vitcc.analysis.ops import OpTable, default_table
from vitcc.pipeline.manager import Insertion, PassManager, PassRegistry, build_pipeline, format_pipeline
from vitcc.pipeline.pass_base import Pass
from vitcc.passes.given_selection import GivenSelection
from vitcc.version import installed_version

PROGRAM_SUFFIX = ".pt2"  # what `save` writes: torch.export.load warns about an archive named otherwise


@dataclass
class CompileResult:
    module: fx.GraphModule  # the compact model: a plain GraphModule, no vitcc code needed to run it
    groups: list[Group]
    selection: Selection  # group name -> kept indices (a mapping)
    report: dict[str, Any]
    program: Program = field(repr=False)


def compile(model: torch.nn.Module, passes: str | list[Pass] | None = "magnitude", *,
            sparsity: float = 0.0, example_inputs: Sequence[torch.Tensor] | None = None,
            prune: Sequence[str] | str | None = None, target: str = "channels", align: int = 1,
            keep: dict[str, Sequence[int]] | None = None, insert: list[Insertion] | None = None,
            verify: bool = True, structural_options: dict[str, dict] | None = None,
            on_pass: Callable[[Pass, str], None] | None = None, on_progress: Callable[[str], None] | None = None,
            data: tuple[DataLoader, DataLoader] | str | None = None, finetune_epochs: int = 0, lr: float = 5e-4,
            distill: bool = True, seed: int = 0, batch_size: int = 64, calibration_size: int = 64,
            sparsity_epochs: int | None = None,
            kd_weight: float = 0.5, temperature: float = 1.0, checkpoint_dir: str | Path | None = None,
            progress: Any = False, registry: PassRegistry | None = None,
            rules: OpTable | Iterable[Callable] | None = None, threads: int | None = None,
            latency_table: str | Path | dict[str, Any] | None = None,
            device: str | torch.device | None = None, precision: str | None = None, recipe: Any = None,
            num_classes: int | None = None) -> CompileResult:
    """Trace, analyze, score, select, rewrite, fold, dce and verify; then optionally fine-tune.

    `keep` gives an explicit selection (group name -> kept indices; a residual branch's name -> [] removes
    it, see `vitcc inspect`) instead of scores and a budget.
    `registry` resolves pass names (default: a fresh `PassRegistry.default()`, so nothing is shared).

    `data` is (train, val) DataLoaders or a spec for `vitcc.training.data.make_loaders` (an ImageFolder tree,
    `mnist5k`, `digits`; built with `batch_size`, `seed` and the model's normalisation). Before the passes
    run it is put in `program.options["data"]`, with a fixed calibration batch of `calibration_size`
    images (and labels) in `options["calibration"]` / `options["calibration_labels"]` for data-driven
    passes. Verification always runs before fine-tuning (which changes the function on purpose). With
    `finetune_epochs > 0` the compact module is fine-tuned (`vitcc.training.finetune.finetune`: AdamW, cosine, `lr`,
    `seed`), distilling from the unpruned traced model when `distill`. With data the report gets
    `accuracy_before` (unpruned), `accuracy_pruned` (before fine-tuning, when fine-tuned),
    `accuracy_after` (top-1/top-5 on val) and the `finetune` history. Weight masks a pass leaves in
    `options["weight_masks"]` (`dimap{granularity=weight}`) are re-applied after every fine-tuning step.

    `rules` is the op table this compile uses (`vitcc.default_table()` plus your `table.rule(...)` additions),
    or functions marked with `@vitcc.rule(...)`, added to a fresh copy of the built-in table.

    `threads` is the intra-op thread count the compact model will run with: `target="latency"` on the CPU
    measures its table at it (each count has its own; default: torch's current count).

    `latency_table` (a path or the dict `vitcc.profiling.profile_table` returns) makes `target="latency"`
    select against that table, measured on its device (`vitcc profile MODEL -o TABLE.json`); it must have been
    measured on this model (one-line error otherwise). Without one, `target="latency"` measures a table where
    the model is (eager, fp32, the example's batch; vitcc.profiling.table_for), once: it is kept under
    `$VITCC_CACHE/tables` (default `~/.cache/vitcc`) for the next compile of the same graph there. `on_progress`
    hears each step of that measurement (a line such as 'mlp/0 3/5 (9/31, ~2 min left)'): it takes minutes on a CPU.

    `sparsity_epochs` sets the sparsity-training phase of the passes that have one (gohsp's stage 2, vtp's
    gates; `options["sparsity_epochs"]`); a pass option such as `vtp{epochs=N}` overrides it.

    The model may be on any device (one device): the example inputs are put where it is, every pass runs
    there, and the compact model is returned there (`vitcc.to_device` moves it, graph included).
    Training (`vitcc.training`): `device` is where fine-tuning, the sparsity training of gohsp and vtp and the
    calibration of taylor and gohsp run ('cpu', 'cuda', 'cuda:N'; default: where the model is); the compact
    module is returned where the model was. `precision` (fp32, bf16, fp16; default bf16 on a GPU that has
    it, else fp32) is the autocast of training; verification stays in fp32. `recipe` (a
    `vitcc.training.recipe.Recipe`) adds DeiT's recipe from timm (RandAugment, random erasing, mixup,
    cutmix, label smoothing, warmup, EMA, drop-path on the compact graph's residual branches).
    `num_classes` puts a new classifier of that many classes on the compact model before fine-tuning (the
    distillation teacher, which knows the old classes, is then not used). Without it, data whose class count
    differs from the model's outputs is an error before any work when fine-tuning is asked, and leaves the
    accuracy figures out (and the calibration labels unused) otherwise. `progress` (True, or the rich
    Console to print on) prints a line per epoch of fine-tuning and of sparsity training.
    """
    if example_inputs is None:
        from vitcc.frontend.input_shapes import input_shape_for
        example_inputs = (torch.randn(input_shape_for(model)),)
    model_device = device_of(model)
    example_inputs = tuple(x.to(model_device) if isinstance(x, torch.Tensor) else x for x in example_inputs)
    if threads is not None and (target != "latency" or isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise VitccError(f"threads={threads!r}: a whole number >= 1, the thread count target='latency' times ops at "
                         f"(target is {target!r})" if target == "latency" else
                         f"threads={threads!r} applies to target='latency' only (target is {target!r}): it is the "
                         "thread count the latency model times ops at")
    table_options = _latency_table_options(latency_table, target)
    model = model.eval()
    from vitcc.training.recipe import Recipe
    recipe = recipe if recipe is not None else Recipe()
    train_device = _training_device(device)
    data, classes_fit = _check_data(model, example_inputs, data, finetune_epochs, num_classes, recipe, seed,
                                    batch_size, train_device)
    captured = isinstance(model, fx.GraphModule) and "tensor_meta" in _any_meta(model)
    # the reference shares the model's tensors and never writes them (a graph that mutates state gets a copy);
    # the passes work on a copy that shares them too until a pass may write weights (Program.own_tensors)
    original = model if captured else capture(model, example_inputs)
    macs_before = original.meta.pop("macs", None) if not captured else None  # where capture had to run it
    if writes_in_place(original.graph):
        original = copy.deepcopy(original)
    if target == "latency" and latency_table is None and keep is None:
        table_options = _table_on_device(original, example_inputs, model_device, threads, progress, on_progress)
    gm, shared = working_copy(original)
    program = Program(gm=gm, example_inputs=example_inputs, original=original, shared=shared,
                      options={"sparsity": sparsity, "prune": prune, "target": target, "align": align,
                               **({"threads": threads} if threads is not None else {}), **table_options},
                      ops=table_with(rules))
    program.options.update(progress=progress, **({"device": train_device} if train_device is not None else {}),
                           **({"precision": precision} if precision is not None else {}))
    loaders, teacher, accuracy = _attach_data(program, data, finetune_epochs, distill and num_classes is None,
                                              seed, lr, batch_size, calibration_size, classes_fit, train_device)
    if sparsity_epochs is not None:
        if sparsity_epochs < 0:
            raise VitccError(f"sparsity epochs must be >= 0, got {sparsity_epochs}")
        program.options["sparsity_epochs"] = int(sparsity_epochs)
    if keep is not None:
        program.options["sparsity"] = 0.0
    pipeline = build_pipeline(passes, insert, structural_options, registry)
    if not verify:
        pipeline = [p for p in pipeline if p.name != "verify"]
    if keep is not None:
        pipeline.insert(next(i for i, p in enumerate(pipeline) if p.name == "select"), GivenSelection(keep))
    PassManager(pipeline, on_pass).run(program)
    program.report.update({"params_before": count_params(original), "macs_before": macs_before
                           if macs_before is not None else count_graph_macs(original, example_inputs)})
    macs_after = program.gm.meta.pop("macs", None)  # counted with the compact graph's shapes, when they were
    blocks, block_of = model_blocks(program.groups)
    gone = {g for name in program.keep.removed for g in program.branch(name).groups}  # went with their branch
    program.report.update({
        "versions": {"vitcc": installed_version(), "torch": torch.__version__},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pipeline": format_pipeline(pipeline),
        "budget": {"sparsity": 0.0 if keep is not None else sparsity, "target": target, "align": align,
                   "prune": prune if prune is None or isinstance(prune, str) else list(prune)},
        "input_shapes": [list(getattr(x, "shape", ())) for x in example_inputs],
        "device": str(model_device),
        "params_after": count_params(program.gm),
        "macs_after": macs_after if macs_after is not None else count_graph_macs(program.gm, example_inputs),
        "groups": [{**g.to_json(), "block": block_of[g.name],
                    "kept": [] if g.name in gone else [int(i) for i in program.keep.get(g.name, range(g.size))]}
                   for g in program.groups],
        "blocks": blocks,
        "widths": kept_widths(program),
        "removed_branches": [b.name for b in program.branches if b.name in program.keep.removed],  # model order
        "branches": [{**b.to_json(), "removed": b.name in program.keep.removed,
                      **({"score": float(program.scores[b.name].sum())} if b.name in program.scores else {})}
                     for b in program.branches],
    })
    program.gm.meta.pop("tensor_meta", None)
    from vitcc.training.surgery import record_branches
    record_branches(program.gm, [b for b in program.branches if b.name not in program.keep.removed])
    if loaders is not None:
        _train(program, loaders, teacher, accuracy, classes_fit, finetune_epochs, lr, kd_weight, temperature, seed,
               checkpoint_dir, progress, train_device, precision, recipe, num_classes, batch_size, distill)
    return CompileResult(program.gm, program.groups, program.keep, program.report, program)


def _training_device(device) -> torch.device | None:
    """The device checked and given its index (`resolve_device`), as `torch.cuda.set_device` needs."""
    return resolve_device(device) if device is not None else None


def _check_data(model, example_inputs, data, finetune_epochs: int, num_classes, recipe, seed: int, batch_size: int,
                device):
    """The loaders (built from a spec) and whether the data's classes fit the model's outputs (None: unknown),
    checked before capture: a data set the head cannot learn is one line before any work."""
    if num_classes is not None and finetune_epochs <= 0:
        raise VitccError("--num-classes puts a new, untrained classifier on the compact model: it needs "
                         "fine-tuning (--finetune-epochs N)")
    if data is None:
        return None, None
    from vitcc.training.data import data_classes, make_loaders, normalization_for
    if isinstance(data, (str, Path)):
        mean, std = normalization_for(model)
        data = make_loaders(str(data), tuple(example_inputs[0].shape[1:]), batch_size=batch_size, mean=mean,
                            std=std, seed=seed, distributed=True, recipe=recipe,
                            pin_memory=device is not None and device.type == "cuda")
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise VitccError("data must be (train_loader, val_loader) or a data spec such as 'mnist5k'")
    have = data_classes(data[0])
    if num_classes is not None and have is not None and have != num_classes:
        raise VitccError(f"--num-classes {num_classes}, but the data has {have} classes; pass --num-classes {have}")
    if have is None:
        return data, None
    from vitcc.training.surgery import output_classes
    outputs = output_classes(model, example_inputs[0])
    if outputs is None or outputs == have:
        return data, None if outputs is None else True
    if finetune_epochs > 0 and num_classes is None:
        raise VitccError(f"the data has {have} classes but the model has {outputs} outputs; pass --num-classes "
                         f"{have} to fine-tune a new classifier for them (or use a model trained for this data)")
    return data, False


def _train(program: Program, loaders, teacher, accuracy, classes_fit, finetune_epochs: int, lr: float,
           kd_weight: float, temperature: float, seed: int, checkpoint_dir, progress, device, precision, recipe,
           num_classes, batch_size: int, distill: bool) -> None:
    """Accuracy before and after, and fine-tuning (with a new classifier when asked), into the report; the
    compact module goes back where it was."""
    from vitcc.training.data import data_classes
    from vitcc.training.distributed import on_device, world_size
    from vitcc.training.finetune import evaluate, finetune, keep_zeros
    train_loader, val_loader = loaders
    report = program.report
    if classes_fit is False:
        report["accuracy_skipped"] = (f"the data has {data_classes(train_loader)} classes and the model other ones: "
                                      "its accuracy is not measured")
    else:
        report["accuracy_before"] = accuracy
    with on_device(program.gm, device):
        if finetune_epochs > 0:
            if num_classes is not None:
                from vitcc.training.surgery import replace_classifier
                report["num_classes"] = replace_classifier(program.gm, num_classes)
            elif classes_fit is not False:
                report["accuracy_pruned"] = evaluate(program.gm, val_loader)
            masks = program.options.get("weight_masks")
            on_step = keep_zeros(masks) if masks else None
            ema = None
            if recipe.ema is not None:
                from timm.utils import ModelEmaV3
                ema = ModelEmaV3(program.gm, decay=recipe.ema)
            history = finetune(program.gm, train_loader, epochs=finetune_epochs, lr=lr, teacher=teacher,
                               kd_weight=kd_weight, temperature=temperature, seed=seed,
                               checkpoint_dir=checkpoint_dir, progress=progress, on_step=on_step, recipe=recipe,
                               device=device, precision=precision, ema=ema)
            report["finetune"] = {"epochs": finetune_epochs, "lr": lr,
                                  "batch_size": getattr(train_loader, "batch_size", None) or batch_size,
                                  "distill": teacher is not None, "kd_weight": kd_weight, "temperature": temperature,
                                  "seed": seed, "num_classes": num_classes, **recipe.to_json(),
                                  "world_size": world_size(), **history}
            if distill and teacher is None and num_classes is not None:
                report["finetune"]["distill_skipped"] = "the unpruned model's head has the old classes"
            if ema is not None:
                report["accuracy_ema"] = evaluate(ema.module, val_loader)
        if classes_fit is not False or num_classes is not None:
            report["accuracy_after"] = evaluate(program.gm, val_loader)


def _latency_table_options(table, target: str) -> dict[str, Any]:
    """The table read and its format checked before tracing; its fit to the model is checked at select."""
    if table is None:
        return {}
    if target != "latency":
        raise VitccError(f"a latency table applies to target='latency' only (target is {target!r})")
    from vitcc.search.latency_table import read_table
    where = "the latency table" if isinstance(table, dict) else str(table)
    return {"latency_table": read_table(table), "latency_table_source": where}


def _table_on_device(gm: fx.GraphModule, example_inputs: tuple, device: torch.device, threads: int | None,
                     progress: Any, on_progress: Callable[[str], None] | None) -> dict[str, Any]:
    """`target="latency"` without a table: one measured where the model is, in eager mode at fp32 and the
    example's batch, or the one the last compile of this graph there left in the cache. Another mode, dtype or
    batch: `vitcc profile ... -o TABLE.json`, then `latency_table=`."""
    from rich.console import Console
    from vitcc.profiling import table_for
    console = progress if isinstance(progress, Console) else Console(stderr=True) if progress else None
    table, where = table_for(gm, example_inputs, device=device, threads=threads,
                             announce=(lambda line: console.print(line, style="dim", highlight=False)) if console
                             else None, on_progress=on_progress)
    return {"latency_table": table, "latency_table_source": where}


def _attach_data(program: Program, data, finetune_epochs: int, distill: bool, seed: int, lr: float,
                 batch_size: int, calibration_size: int, classes_fit: bool | None, device: torch.device | None):
    """Loaders (from `_check_data`) and calibration batch into program.options (before any pass), the teacher,
    accuracy before (measured on the training `device`, as the accuracy after is). Where the data's classes
    are not the model's (`classes_fit` False) the passes get no labels and no accuracy is measured."""
    if finetune_epochs < 0:
        raise VitccError(f"finetune epochs must be >= 0, got {finetune_epochs}")
    if data is None:
        if finetune_epochs > 0:
            raise VitccError("fine-tuning needs data: pass --data (e.g. --data mnist5k) or data=(train, val)")
        return None, None, None
    from vitcc.training.data import calibration_batch
    from vitcc.training.distributed import device_copy
    from vitcc.training.finetune import evaluate
    train_loader, val_loader = data
    images, labels = calibration_batch(train_loader, calibration_size, with_labels=True)
    program.options.update(data=(train_loader, val_loader), calibration=images,
                           calibration_labels=labels if classes_fit is not False else None, seed=seed, lr=lr)
    teacher = copy.deepcopy(program.gm).eval() if distill and finetune_epochs > 0 else None
    accuracy = evaluate(device_copy(program.gm, device), val_loader) if classes_fit is not False else None
    return (train_loader, val_loader), teacher, accuracy


def rule(*targets: Any) -> Callable:
    """Mark a coupling rule ``fn(analyzer, node) -> type`` for aten overloads (or packets), to pass to
    `vitcc.compile(..., rules=[fn])`. Marking changes nothing global: each compile gets its own table."""
    def mark(fn: Callable) -> Callable:
        fn.vitcc_targets = targets
        return fn
    return mark


def table_with(rules: OpTable | Iterable[Callable] | None) -> OpTable:
    """A compile's own op table: a copy of the given one, or the built-ins plus `@vitcc.rule` functions."""
    if isinstance(rules, OpTable):
        return rules.copy()
    table = default_table()
    for fn in rules or ():
        targets = getattr(fn, "vitcc_targets", None)
        if not targets:
            raise VitccError(f"rules: {getattr(fn, '__name__', fn)!r} is not marked with @vitcc.rule(op)")
        table.rule(*targets)(fn)
    return table


def kept_widths(program: Program) -> dict[str, dict[str, int]]:
    """Per group kind: channels before and after, summed over groups (and branches, when any were removed)."""
    return program.keep.widths(program.groups, program.branches if program.keep.removed else ())


def _any_meta(gm: fx.GraphModule) -> dict:
    for n in gm.graph.nodes:
        return n.meta
    return {}


def save(module: fx.GraphModule, path: str | Path, example_inputs: tuple | None = None) -> None:
    """Write the compact program with torch.export.save (a graph as data, with a dynamic batch), atomically.

    The file loads with `torch.export.load(path).module()` or `vitcc.load(path)`: no vitcc code, no unpickling,
    no trust needed. It must be named `.pt2`: torch.export.load warns about an archive named otherwise, and a
    `.pt` would pass for a torch.save'd file (which would carry Python source only --trust-pickle could read).
    A module on a GPU is written from a CPU copy: the file loads on any machine (`vitcc.to_device` moves it).
    """
    path = Path(path)
    if path.suffix != PROGRAM_SUFFIX:
        raise VitccError(f"cannot save {path}: a program archive is named {PROGRAM_SUFFIX} (torch.export.load warns "
                         f"about other names); name it {path.with_suffix(PROGRAM_SUFFIX).name}")
    if example_inputs is None:
        shape = source_meta(module).get("input_shape")
        if not shape:
            raise VitccError(f"cannot save {path}: pass example_inputs (the model's input shape is unknown)")
        example_inputs = (torch.randn(tuple(shape)),)
    if device_of(module).type != "cpu":
        module = moved_copy(module, "cpu")
    example_inputs = tuple(x.cpu() if isinstance(x, torch.Tensor) else x for x in example_inputs)
    was_training = module.training
    try:
        ep, _ = export_program(module.eval(), tuple(example_inputs))
    finally:
        module.train(was_training)
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    try:
        with open(tmp, "wb") as f:
            torch.export.save(ep, f)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | Path, *, trust_pickle: bool = False, device: str | torch.device | None = None) -> torch.nn.Module:
    """Load a compiled model (a program archive, whatever its suffix) as a trainable GraphModule; other files
    go through the safe loader (a pickled GraphModule from an older vitcc needs trust_pickle). With `device`,
    moved there (`to_device`: the devices its graph names too)."""
    from vitcc.frontend.sources import load_model
    module = load_model(str(path), trust_pickle=trust_pickle)
    return module if device is None else to_device(module, device)
