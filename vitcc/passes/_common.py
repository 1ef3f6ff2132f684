"""Machinery shared by the method passes of the four papers (gohsp, dimap, vtp, lowrank).

* **Score ownership.** Each method scores the group kinds it was designed for (*primary* scores) and fills
  every group nobody scored with a magnitude score (*fallback*), so select never ranks a group by
  position. A primary score overwrites anything; a fallback score is written only where no score exists
  yet or where the score is another pass's fallback. So in a pipeline the last pass that scores a group as
  primary wins, and fallbacks never override a real method. Claims live in `program.options["claims"]`
  (group name -> (pass, primary, score tensor)); a claim is live only while `program.scores[name]` is the
  tensor it registered, so a core pass that rescores everything (magnitude, lamp, random, taylor) cancels
  it. `program.report["score_source"]` lists the live claims.
* **Threshold families.** A method may ask for one threshold shared by several groups (dimap: per module
  family; vtp: one global gate threshold): `program.options["families"][name] = (family, scores)`, read by
  select while the group's scores are still that tensor.
* **Default kinds.** A method narrows the default `prune` kinds (when the user gave none) to those it was
  designed for; several methods in one pipeline take the union.
* **Data and training** through `vitcc.training.finetune.finetune`, with one-line errors when data is missing.
* **Graph surgery** on the captured aten graph (vtp's gates, lowrank's factorisation) starts from
  `linear_nodes`: the aten.linear nodes whose weight (and bias) are parameters only they read.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.fx as fx

from vitcc.devices import device_of
from vitcc.errors import VitccError
from vitcc.ir.program import Program
from vitcc.pipeline.pass_base import Option
from vitcc.search.choose import choose
from vitcc.ir.selection import Selection, prune_kinds
from vitcc.ir.spaces import axis_kept, normalize

from vitcc.search.scores import axis_index_map, group_norms

aten = torch.ops.aten


# -- score ownership ---------------------------------------------------------------------------------

def claim(program: Program, pass_name: str, group_name: str, scores: torch.Tensor, *, primary: bool = True,
          family: str | None = None) -> bool:
    """Write scores for a group under the ownership rules above; returns whether they were written."""
    claims = program.options.setdefault("claims", {})
    current = program.scores.get(group_name)
    owner = claims.get(group_name)
    live = owner is not None and owner[2] is current
    if owner is not None and owner[0] == "lowrank:rank" and live:
        return False  # rank groups of a low-rank factorisation are scored by singular values only
    if not primary and current is not None and (not live or owner[1]):
        return False  # someone scored it for real: a fallback never overrides that
    t = scores.detach().float().cpu().clone()  # scores live on the CPU, where select ranks them
    program.scores[group_name] = t
    claims[group_name] = (pass_name, primary, t)
    fams = program.options.setdefault("families", {})
    if family is None:
        fams.pop(group_name, None)
    else:
        fams[group_name] = (family, t)
    _report_sources(program)
    return True


def _report_sources(program: Program) -> None:
    claims = program.options.get("claims", {})
    program.report["score_source"] = {
        name: f"{who}{'' if primary else ' (fallback: magnitude)'}"
        for name, (who, primary, t) in claims.items() if program.scores.get(name) is t}


def fill_fallback(program: Program, pass_name: str) -> None:
    """Group L2 norm for every group that no pass has scored (a primary method may overwrite it later)."""
    cache: dict = {}
    for g in program.groups:
        claim(program, pass_name, g.name, group_norms(program, g, 2.0, cache).sqrt(), primary=False)


def owned_by_other(program: Program, pass_name: str, group_name: str) -> bool:
    """Is the group's current score a live primary claim of another pass?"""
    owner = program.options.get("claims", {}).get(group_name)
    return owner is not None and owner[1] and owner[0] != pass_name and program.scores.get(group_name) is owner[2]


def default_kinds(program: Program, kinds) -> set[str]:
    """Narrow the default `prune` kinds to `kinds` (union over methods) when the user gave none."""
    mine = program.options.get("prune_from_methods")
    if program.options.get("prune") is None or mine is not None:
        union = sorted(set(mine or ()) | set(kinds))
        program.options["prune_from_methods"] = union
        program.options["prune"] = ",".join(union)
    return _kinds_of(program)


def _kinds_of(program: Program) -> set[str]:
    return prune_kinds(program.options.get("prune"))


# -- selections as parameter masks -----------------------------------------------------------------------

def provisional_keep(program: Program, scores: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
    """What select would keep now (same budget and options), without touching the program."""
    tmp = copy.copy(program)
    tmp.scores = {**program.scores, **(scores or {})}
    tmp.keep = {}
    tmp.report = {}
    return choose(tmp, dict(program.options))[0]


def keep_by_root(program: Program, keep: dict[str, np.ndarray]) -> dict[int, np.ndarray]:
    return Selection(keep).by_root(program.groups)


def param_masks(program: Program, keep: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Boolean keep-mask of every parameter that loses entries under `keep` (group name -> kept indices)."""
    roots = keep_by_root(program, keep)
    state = dict(program.gm.named_parameters())
    out = {}
    for name, t in program.coupling.params.items():
        w = state.get(name)
        if w is None:
            continue
        mask = None
        for axis, ax in enumerate(t):
            idx = axis_kept(normalize(ax), roots)
            if len(idx) == w.shape[axis]:
                continue
            m = torch.zeros(w.shape[axis], dtype=torch.bool, device=w.device)
            m[torch.as_tensor(idx, dtype=torch.long, device=w.device)] = True
            shape = [1] * w.dim()
            shape[axis] = -1
            m = m.reshape(shape)
            mask = m if mask is None else mask & m
        if mask is not None:
            out[name] = mask.expand_as(w).clone()
    return out


def index_map_of(program: Program, group, param: str, axis: int) -> torch.Tensor:
    """For each position of `param`'s `axis`, the group index it lies on (-1 where none)."""
    return torch.as_tensor(axis_index_map(program.coupling.params[param][axis], group.space))


def group_energy(program: Program, group, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-index sum of squares over the group's slices of `tensors` (name -> tensor shaped like the param)."""
    total = torch.zeros(group.size, dtype=torch.float64)
    for m in group.members:
        w = tensors.get(m.param)
        if w is None:
            continue
        idx = index_map_of(program, group, m.param, m.axis)
        rows = w.detach().double().pow(2).movedim(m.axis, 0).reshape(w.shape[m.axis], -1).sum(1).cpu()
        sel = idx >= 0
        total.index_add_(0, idx[sel], rows[sel])
    return total


# -- graph surgery on aten.linear ------------------------------------------------------------------------

def linear_nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    """Weight name -> its aten.linear node, for linears that alone read their weight and bias parameters.

    Only such a linear can have its rows rescaled (vtp) or be replaced (lowrank) without changing another
    op that reads the same tensor (tied weights, a weight reused by a second call).
    """
    readers: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            readers.setdefault(n.target, []).extend(n.users)
    out = {}
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not aten.linear.default:
            continue
        w = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
        b = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        tensors = [t for t in (w, b) if t is not None]
        if all(isinstance(t, fx.Node) and t.op == "get_attr" and readers.get(t.target) == [n] for t in tensors):
            out[w.target] = n
    return out


# -- data and training -------------------------------------------------------------------------------------

_HOW = ("pass --data (e.g. --data mnist5k, or an image folder with train/ and val/) or "
        "vitcc.compile(..., data=make_loaders(...))")


def calibration(program: Program, pass_name: str) -> torch.Tensor:
    x = program.options.get("calibration")
    if x is None:
        raise VitccError(f"pass {pass_name!r} needs calibration data: {_HOW}")
    return x


def train_loader(program: Program, pass_name: str, why: str):
    data = program.options.get("data")
    if data is None:
        raise VitccError(f"pass {pass_name!r} needs training data for {why}: {_HOW}")
    return data[0]


# the options sparsity_train and epochs_of read from a pass's options (gohsp's stage 2, vtp's gates)
SPARSITY_TRAINING_OPTIONS = (
    Option("epochs", int, None, "sparsity-training epochs (default: --sparsity-epochs, else the pass's own)"),
    Option("lr", float, None, "sparsity-training learning rate (default: the compile's lr, 5e-4)"),
    Option("weight_decay", float, 0.05, "sparsity-training AdamW weight decay"),
)


def sparsity_train(program: Program, pass_name: str, options: dict, *, epochs: int, extra_loss=None,
                   on_step=None, label: str | None = None) -> dict:
    """Train program.gm in place (vitcc.training.finetune.finetune, no distillation) for a sparsity-training
    phase, on the compile's training device (`training_device`) and precision, printing a line per epoch
    when the compile shows progress; the graph is back on its own device afterwards."""
    from vitcc.training.distributed import on_device
    from vitcc.training.finetune import finetune
    loader = train_loader(program, pass_name, "its sparsity-training phase")
    gm = program.gm
    with on_device(gm, training_device(program)):
        history = finetune(gm, loader, epochs=int(epochs),
                           lr=float(options.get("lr", program.options.get("sparsity_lr", program.options.get("lr", 5e-4)))),
                           extra_loss=extra_loss, on_step=on_step, seed=int(program.options.get("seed", 0)),
                           weight_decay=float(options.get("weight_decay", 0.05)),
                           progress=program.options.get("progress", False),
                           precision=program.options.get("precision"), label=label or f"{pass_name} sparsity training")
    gm.eval()
    return history


def training_device(program: Program) -> torch.device:
    """Where data-driven passes train and calibrate: `options["device"]` (compile's `device`), else the graph's
    (calibration images are on the CPU whatever the model's device)."""
    return program.options.get("device") or device_of(program.gm)


def epochs_of(program: Program, options: dict, default: int = 0) -> int:
    e = options.get("epochs", program.options.get("sparsity_epochs"))
    e = default if e is None else int(e)
    if e < 0:
        raise VitccError(f"sparsity-training epochs must be >= 0, got {e}")
    return e


def rebase(program: Program) -> None:
    """The weights changed on purpose (sparsity training, factorisation): the masked reference is now them."""
    program.original = copy.deepcopy(program.gm)


def budget(program: Program) -> float:
    s = float(program.options.get("sparsity", 0.0) or 0.0)
    if not 0.0 <= s < 1.0:
        raise VitccError(f"sparsity must be in [0, 1), got {s}")
    return s


def module_families(program: Program) -> dict[str, str]:
    """Linear weight name -> QKV | PRJ | MLP, from the groups laid on its rows and columns."""
    fam: dict[str, str] = {}
    for g in program.groups:
        for m in g.members:
            if not m.param.endswith("weight") or len(program.coupling.params[m.param]) != 2:
                continue
            if g.kind in ("heads", "head_dim"):
                fam.setdefault(m.param, "QKV" if m.axis == 0 else "PRJ")
            elif g.kind == "mlp" and not is_rank_group(program, g):
                fam.setdefault(m.param, "MLP")
    return fam


def is_rank_group(program: Program, g) -> bool:
    """A group of rank dimensions (the inner width of a factorised projection, lowrank's): not MLP neurons."""
    return g.kind == "rank"
