"""Loss models: what a removal loses, one number for branches and channels alike.

The budget search (vitcc.search.budget) weighs candidates that reach the same cost by what they lose. Two
models: the channels' scores (each channel's score over the mean of its kind, times the parameters it owns),
and with a calibration batch (`--data`) the measured change of the output under the masked reference.
"""
from __future__ import annotations

import torch

from vitcc.analysis.branches import Branch, numel
from vitcc.devices import device_of
from vitcc.ir.selection import KeptByRoot
from vitcc.reference.masking import MaskedInterpreter
from vitcc.reference.verification import tensor_leaves


CALIBRATION_IMAGES = 32  # images of the calibration batch a measured loss runs on


def score_branches(program) -> None:
    """`program.scores[name]` (one value) for every branch that has none: what removing it alone loses
    (`loss_model`): with a calibration batch the measured change of the output; else what its channels score,
    each channel's score relative to the mean of its kind, weighted by the parameters it owns, summed over the
    branch (so a branch of average importance scores its parameter count, and narrowing all of its groups to
    nothing would lose the same)."""
    todo = [b for b in program.branches if b.name not in program.scores]
    if not todo:
        return
    loss = loss_model(program)
    for b in todo:
        program.scores[b.name] = torch.tensor([loss.alone(b)], dtype=torch.float64)


def loss_model(program) -> "LossModel":
    """The measured output change when the compile has a calibration batch (`--data`), else the scores."""
    x = program.options.get("calibration")
    return MeasuredLoss(program, x[:CALIBRATION_IMAGES]) if isinstance(x, torch.Tensor) else ScoreLoss(program)


class LossModel:
    """What a selection loses, one number for branches and channels alike, so the search can weigh removing a
    branch against narrowing: `loss(selection)`, and `alone(branch)` for removing one branch only."""

    def __init__(self, program):
        self.program = program

    def __call__(self, selection) -> float:
        raise NotImplementedError

    def alone(self, b: Branch) -> float:
        raise NotImplementedError


class ScoreLoss(LossModel):
    """The sum over what a selection removes of normalised score x parameters owned (channels: the method's
    scores over the mean of their kind; a branch: its score)."""

    def __init__(self, program):
        super().__init__(program)
        self.params = {p: numel(program.original, p) for p in program.coupling.params}
        self.normalized, self.unit = {}, {}
        means: dict[str, float] = {}
        for kind in {g.kind for g in program.groups}:
            s = [program.scores[g.name].double().abs() for g in program.groups if g.kind == kind and g.name in program.scores]
            means[kind] = float(torch.cat(s).mean()) if s else 1.0
        inside = {g: b for b in program.branches for g in b.groups}
        per_channel = {g.name: sum(self.params.get(m.param, 0) / max(1, g.size) for m in g.members)
                       for g in program.groups}
        sizes = {g.name: g.size for g in program.groups}
        for g in program.groups:
            if g.name not in program.scores:
                continue
            self.normalized[g.name] = program.scores[g.name].double().abs() / max(means[g.kind], 1e-30)
            b = inside.get(g.name)
            weight = 1.0
            if b is not None:  # heads and head dims lie on the same weights: a branch's groups share its parameters
                mass = sum(per_channel[n] * sizes[n] for n in b.groups)
                weight = self.branch_params(b) / max(mass, 1e-30)
            self.unit[g.name] = weight * per_channel[g.name]

    def branch_params(self, b: Branch) -> int:
        return sum(self.params.get(p, 0) for p in b.params)

    def alone(self, b: Branch) -> float:
        if not b.params:
            return float("inf")  # nothing scores it: removed only when nothing else can be
        total = sum(float(self.normalized[n].sum()) * self.unit[n] for n in b.groups if n in self.normalized)
        if not any(n in self.normalized for n in b.groups):
            total = float(self.branch_params(b))  # no scored channel of its own: of average importance
        return total

    def __call__(self, selection) -> float:
        removed = selection.removed
        gone = {n for b in self.program.branches if b.name in removed for n in b.groups}
        total = sum(float(self.program.scores[b].sum()) for b in removed)
        for name, kept in selection.items():
            if name in gone or name not in self.normalized:
                continue
            s = self.normalized[name]
            total += (float(s.sum()) - float(s[torch.as_tensor(kept, dtype=torch.long)].sum())) * self.unit[name]
        return total


class MeasuredLoss(LossModel):
    """Relative squared change of every output on the calibration batch, under the masked reference."""

    def __init__(self, program, x: torch.Tensor):
        super().__init__(program)
        self.x = x.to(device_of(program.original))  # calibration images are on the CPU; the model may not be
        with torch.no_grad():
            self.reference = self._outputs(program.original.eval()(self.x))

    def alone(self, b: Branch) -> float:
        return self.measured(KeptByRoot({}, {b.name}))

    def __call__(self, selection) -> float:
        return self.measured(selection.by_root(self.program.groups))

    def measured(self, keep) -> float:
        zeroed = self.program.removed_outputs(keep)
        with torch.no_grad():
            out = MaskedInterpreter(self.program.original, self.program.coupling, keep, self.program.ops,
                                    zeroed=zeroed).run(self.x)
        got = self._outputs(out)
        num = sum(float((got[k].double() - v.double()).pow(2).sum()) for k, v in self.reference.items())
        den = sum(float(v.double().pow(2).sum()) for v in self.reference.values())
        return num / max(den, 1e-30)

    @staticmethod
    def _outputs(out) -> dict[str, torch.Tensor]:
        return {k: v for k, v in tensor_leaves(out) if v.is_floating_point()}
