"""taylor: first-order Taylor importance of each channel, head and neuron (baseline; needs calibration data).

Removing channel i of a group changes the loss by about -sum_{w in slices of i} w * dL/dw (first-order
Taylor expansion around the current weights, Molchanov et al. 2019, "Importance Estimation for Neural
Network Pruning"), summed over every parameter slice the group lays on i (all members: a head's q, k, v
rows and its proj columns; a residual channel's slices of every layer reading or writing the stream).
`reduce=abs` (default) scores index i by sum |w * dL/dw| over those weights, the form Torch-Pruning's
GroupTaylorImportance uses; `reduce=group` by |sum w * dL/dw|, Molchanov's estimate for removing the whole
group, in which terms of opposite sign cancel. Computed per calibration batch and averaged over batches.
On mnist5k `reduce=group` kept less accuracy after fine-tuning than random pruning
(benchmarks/results/accuracy_small.md of 2026-11-25, first run), hence the default.

The loss is cross-entropy against the calibration labels when the data has them (`taylor{target=labels}`,
the default) or against the unpruned model's own predictions (`taylor{target=pred}`), so it also works
for data whose classes the model does not know. Options: `batch` (calibration images per backward,
default 16), `reduce` (abs | group). Calibration comes from `program.options["calibration"]` (`vitcc.compile(..., data=...)`,
`vitcc compile --data`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vitcc.errors import VitccError
from vitcc.ir.program import Program
from vitcc.passes._common import training_device
from vitcc.pipeline.pass_base import Option, Pass, PassResult, register_pass

from vitcc.search.scores import group_slice_sums
from vitcc.training.distributed import device_copy


def calibration_of(program: Program, method: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images, labels or None) given to the compile, or a one-line error naming how to give them."""
    x = program.options.get("calibration")
    if x is None:
        raise VitccError(f"pass {method!r} needs calibration data: pass --data (e.g. --data mnist5k, or an image "
                         "folder with train/ and val/) or vitcc.compile(..., data=make_loaders(...))")
    return x, program.options.get("calibration_labels")


@register_pass("taylor")
class Taylor(Pass):
    """First-order Taylor scores (sum |w * dL/dw| or |sum w * dL/dw| over a group index's slices), averaged
    over calibration batches."""
    writes_weights = False  # reads weights only (Pass.writes_weights)
    options_spec = (Option("target", str, "labels", "loss against the calibration labels or the model's own "
                           "predictions", choices=("labels", "pred")),
                    Option("reduce", str, "abs", "sum |w * dL/dw| (abs) or |sum w * dL/dw| (group)",
                           choices=("abs", "group")),
                    Option("batch", int, 16, "calibration images per backward"))

    def run(self, program: Program) -> PassResult:
        x, labels = calibration_of(program, "taylor")
        target = str(self.option("target"))
        if target not in ("labels", "pred"):
            raise VitccError(f"taylor{{target={target}}}: expected labels or pred")
        use_labels = target == "labels" and labels is not None
        reduce = str(self.option("reduce"))
        if reduce not in ("abs", "group"):
            raise VitccError(f"taylor{{reduce={reduce}}}: expected abs or group")
        elementwise = reduce == "abs"
        bs = max(1, int(self.option("batch")))
        device = training_device(program)
        gm = device_copy(program.gm, device)  # gradients on the device; the program's weights stay where they are
        params = dict(gm.named_parameters())
        flags = {n: p.requires_grad for n, p in params.items()}
        was_training = gm.training
        gm.eval()
        totals = {g.name: torch.zeros(g.size, dtype=torch.float64) for g in program.groups}
        batches = 0
        try:
            for p in params.values():
                p.requires_grad_(True)
                p.grad = None
            for start in range(0, len(x), bs):
                xb = x[start:start + bs].to(device)
                with torch.enable_grad():
                    logits = gm(xb)
                    logits = logits[0] if isinstance(logits, (tuple, list)) else logits
                    if use_labels:
                        yb = labels[start:start + bs]
                        if int(yb.max()) >= logits.shape[-1]:
                            raise VitccError(f"taylor: the data has class {int(yb.max())} but the model has only "
                                             f"{logits.shape[-1]} outputs; use taylor{{target=pred}} or matching data")
                        yb = yb.to(logits.device)
                    else:
                        yb = logits.detach().argmax(-1)
                    loss = F.cross_entropy(logits, yb)
                    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
                wg = {n: (p.detach().double() * g.double()) for (n, p), g in zip(params.items(), grads) if g is not None}
                if elementwise:
                    wg = {n: t.abs() for n, t in wg.items()}
                wg = {n: t.cpu() for n, t in wg.items()}  # scores are summed on the CPU
                cache: dict = {}

                def rows(name, t, axis):
                    key = (name, axis)
                    if key not in cache:
                        cache[key] = t.movedim(axis, 0).reshape(t.shape[axis], -1).sum(1)
                    return cache[key]
                for g in program.groups:
                    totals[g.name] += group_slice_sums(program, g, rows, tensors=wg).abs()
                batches += 1
        finally:
            for n, p in params.items():
                p.grad = None
                p.requires_grad_(flags[n])
            gm.train(was_training)
        for g in program.groups:
            program.scores[g.name] = (totals[g.name] / max(batches, 1)).float()
        return PassResult(info={"images": len(x), "batches": batches, "reduce": reduce,
                                "target": "labels" if use_labels else "pred"})
