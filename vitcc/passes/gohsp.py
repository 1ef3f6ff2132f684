"""gohsp: graph-based head ranking + optimisation-based heterogeneous structured sparsity (Yin, Uzkent,
Shen, Jin, Yuan, "GOHSP: A Unified Framework of Graph and Optimization-based Heterogeneous Structured
Pruning for Vision Transformer", AAAI 2023, arXiv 2301.05345). No public code. Needs calibration data.

What the paper **states**:
- stage 1 ranks attention heads with a graph: the correlation between heads is modelled as a Markov chain
  whose converged (stationary) distribution is the heads' importance;
- stage 2 uses that ranking as a soft guide inside an optimisation that imposes *heterogeneous*
  structured sparsity (heads in attention, neurons/channels elsewhere); then hard pruning and fine-tuning.

What vitcc **reconstructs** (the paper leaves these open):
- nodes are all L x H heads; head i of attention layer l has an edge to head j of layer l+1 weighted by
  how strongly their outputs correlate on the calibration batch (`program.options["calibration"]`). A
  head's output is read at the attention product (SDPA or attn @ v) whose type carries the block's head
  space; the correlation is linear CKA between the two heads' (tokens x head dim) outputs
  (`edge=cka`, default: it compares representations whose dimensions do not correspond), or
  `edge=pearson`: |Pearson correlation| of the per-token output norms. Windowed or resolution-changing
  models (Swin) correlate per-image mean outputs instead of per-token ones;
- the chain is the row-normalised graph plus a teleport term (`alpha`, default 0.85), i.e. networkx's
  PageRank; its stationary vector scores the heads, and heads are kept per layer (uniform fraction per
  block). Edges run both ways between consecutive layers by default (`direction=both`): in a forward-only
  chain the first layer's heads receive no edges, only teleport mass, and tie (`direction=forward|backward`
  builds the one-way chains; ties are broken by head weight norm). `ranking=norm` scores heads by their
  own weight norm instead (the ablation of the paper's claim);
- stage 2 (when `epochs=N` or `options["sparsity_epochs"]` > 0): sparsity training
  (`vitcc.training.finetune.finetune`, no distillation) towards the structured-sparse set select would produce for
  the budget: heads fixed by the ranking, head dims and MLP neurons (and residual channels if pruned)
  re-chosen by norm every `every` steps. `stage2=prox` (default): after every optimizer step the slices
  outside the set shrink by (1 - pull), so that they keep `residue` (1%) of their size at the end: the
  proximal step of a growing group penalty. `stage2=admm`: the ADMM form, `rho/2 ||W - Z + U||^2` in the
  loss with Z the projection of W + U and dual updates U += W - Z; under Adam and an epoch or two it
  barely moves the weights (measured: it lowered the one-shot accuracy of the small benchmark ViT), which
  is why prox is the default. After it, head dims and neurons are scored by their membership of the last
  target set (first) and their trained norm (second), and the masked reference becomes the trained model;
- without stage 2, groups other than heads get magnitude fallback scores.
Default kinds: heads, head_dim, mlp. Composition: gohsp's primary structure is heads (plus, after stage 2,
the structures it trained); see dimap for how `gohsp,dimap` resolves.
"""
from __future__ import annotations

import networkx as nx
import numpy as np
import torch
import torch.fx as fx

from vitcc.ir.types import is_ttype
from vitcc.errors import VitccError
from vitcc.ir.program import Program
from vitcc.pipeline.pass_base import Pass, PassResult, register_pass
from vitcc.pipeline.pass_base import Option
from vitcc.ir.spaces import find, normalize

from vitcc.passes._common import (calibration, claim, default_kinds, epochs_of, fill_fallback, group_energy, param_masks, provisional_keep, rebase, sparsity_train, train_loader, training_device)
from vitcc.training.distributed import device_copy, on_device
from vitcc.passes._common import SPARSITY_TRAINING_OPTIONS
from vitcc.search.scores import group_norms

aten = torch.ops.aten
# ops whose output can be a head's output: fused attention, attn @ v as matmul/bmm, or an einsum
_ATTENTION_PRODUCTS = {aten.scaled_dot_product_attention, aten.matmul, aten.bmm, aten.einsum}


def _is_attention_product(node: fx.Node) -> bool:
    return node.op == "call_function" and getattr(node.target, "overloadpacket", None) in _ATTENTION_PRODUCTS


def attention_outputs(program: Program) -> list[tuple[object, str, int]]:
    """(heads group, node name, head axis) per attention layer, in graph order: the last attention product
    whose type has the group's head space on one axis and a head-dim space as its last axis."""
    heads = {find(g.space).id: g for g in program.groups if g.kind == "heads"}
    found: dict[str, tuple] = {}
    for pos, node in enumerate(program.gm.graph.nodes):
        t = program.coupling.types.get(node.name)
        if not is_ttype(t) or len(t) < 2 or not _is_attention_product(node):
            continue
        last = normalize(t[-1])
        if len(last) != 1 or isinstance(last[0], int):
            continue
        for a, ax in enumerate(t[:-1]):
            ax = normalize(ax)
            if len(ax) == 1 and not isinstance(ax[0], int) and find(ax[0]).id in heads:
                g = heads[find(ax[0]).id]
                found[g.name] = (pos, g, node.name, a)  # the last one wins (attn @ v after q @ k^T)
    return [(g, name, a) for pos, g, name, a in sorted(found.values(), key=lambda v: v[0])]


class _Capture(fx.Interpreter):
    def __init__(self, gm, names):
        super().__init__(gm)
        self.names, self.out = set(names), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.names:
            self.out[n.name] = out.detach()
        return out


def head_graph(program: Program, x: torch.Tensor, edge: str = "cka", chunk: int = 32):
    """Edge weights between consecutive attention layers' heads, from the calibration batch.

    Returns (layers, weights): layers = [(group, H)], weights[l] = array (H_l, H_{l+1}).
    """
    layers = attention_outputs(program)
    if not layers:
        return [], []
    names = [name for _, name, _ in layers]
    device = training_device(program)
    gm = device_copy(program.gm, device)  # calibration runs on the training device; the program stays put
    was_training = gm.training
    gm.eval()
    acc = [dict(n=0, s=None, g=None, s2=None) for _ in layers]
    cross = [None] * (len(layers) - 1)
    mode = None
    try:
        with torch.no_grad():
            for start in range(0, len(x), chunk):
                xb = x[start:start + chunk].to(device)
                cap = _Capture(gm, names)
                cap.run(xb)
                feats = []
                for (g, name, a) in layers:
                    out = cap.out[name].movedim(a, -2)  # [..., H, D]
                    feats.append(out)
                if mode is None:
                    rows = {f.shape[:-2].numel() // len(xb) for f in feats}
                    mode = "token" if len(rows) == 1 and all(f.shape[0] == len(xb) for f in feats) else "image"
                feats = [f.reshape(-1, *f.shape[-2:]) if mode == "token" else
                         f.reshape(len(xb), -1, *f.shape[-2:]).mean(1) for f in feats]
                feats = [f.double() for f in feats]
                if edge == "pearson":
                    feats = [f.norm(dim=-1, keepdim=True) for f in feats]  # [M, H, 1]
                flat = [f.reshape(f.shape[0], -1) for f in feats]
                for i, f in enumerate(flat):
                    st = acc[i]
                    st["n"] += f.shape[0]
                    st["s"] = f.sum(0) if st["s"] is None else st["s"] + f.sum(0)
                    gram = f.T @ f
                    st["g"] = gram if st["g"] is None else st["g"] + gram
                for i in range(len(flat) - 1):
                    c = flat[i].T @ flat[i + 1]
                    cross[i] = c if cross[i] is None else cross[i] + c
    finally:
        gm.train(was_training)
    for st in acc:
        st["s"], st["g"] = st["s"].cpu(), st["g"].cpu()
    cross = [c.cpu() for c in cross]
    weights = []
    shapes = [(layers[i][0].size, acc[i]["s"].numel() // layers[i][0].size) for i in range(len(layers))]
    centred = []
    for st in acc:
        n = st["n"]
        centred.append(st["g"] - torch.outer(st["s"], st["s"]) / n)
    for i in range(len(layers) - 1):
        (h1, d1), (h2, d2) = shapes[i], shapes[i + 1]
        n = acc[i]["n"]
        c = cross[i] - torch.outer(acc[i]["s"], acc[i + 1]["s"]) / n
        w = np.zeros((h1, h2))
        for a in range(h1):
            ga = centred[i][a * d1:(a + 1) * d1, a * d1:(a + 1) * d1]
            for b in range(h2):
                gb = centred[i + 1][b * d2:(b + 1) * d2, b * d2:(b + 1) * d2]
                cab = c[a * d1:(a + 1) * d1, b * d2:(b + 1) * d2]
                if edge == "pearson":  # 1x1 blocks: covariance / sqrt(var var)
                    den = float(ga.squeeze().clamp_min(0).sqrt() * gb.squeeze().clamp_min(0).sqrt())
                    w[a, b] = abs(float(cab.squeeze())) / den if den > 0 else 0.0
                else:  # linear CKA
                    den = float(ga.norm() * gb.norm())
                    w[a, b] = float(cab.pow(2).sum()) / den if den > 0 else 0.0
        weights.append(w)
    return [(g, g.size) for g, _, _ in layers], weights


def markov_ranking(layers, weights, alpha: float = 0.85, direction: str = "both") -> dict[str, torch.Tensor]:
    """Stationary distribution of the head chain (networkx PageRank): group name -> score per head.

    `direction`: forward (head of layer l -> heads of layer l+1), backward, or both (default). In a
    one-way chain the heads of the first (forward) or last (backward) layer receive no edges, only the
    teleport mass, so they tie; `both` ranks every layer.
    """
    G = nx.DiGraph()
    for l, (g, h) in enumerate(layers):
        G.add_nodes_from((l, i) for i in range(h))
    for l, w in enumerate(weights):
        for i in range(w.shape[0]):
            for j in range(w.shape[1]):
                if w[i, j] > 0:
                    if direction in ("forward", "both"):
                        G.add_edge((l, i), (l + 1, j), weight=float(w[i, j]))
                    if direction in ("backward", "both"):
                        G.add_edge((l + 1, j), (l, i), weight=float(w[i, j]))
    pr = nx.pagerank(G, alpha=alpha, weight="weight", tol=1e-12, max_iter=10000)
    return {g.name: torch.tensor([pr[(l, i)] for i in range(h)], dtype=torch.float64)
            for l, (g, h) in enumerate(layers)}


@register_pass("gohsp")
class Gohsp(Pass):
    """Markov-chain head ranking on calibration data, optionally with structured sparsity training (stage 2)."""
    options_spec = (
        Option("ranking", str, "markov", "heads by the Markov chain or by weight norm", choices=("markov", "norm")),
        Option("edge", str, "cka", "head correlation: linear CKA or |Pearson| of token norms",
               choices=("cka", "pearson")),
        Option("direction", str, "both", "edges between consecutive layers", choices=("both", "forward", "backward")),
        Option("alpha", float, 0.85, "PageRank damping (1 - teleport)"),
        Option("stage2", str, "prox", "sparsity training: proximal shrinking or ADMM", choices=("prox", "admm")),
        Option("rho", float, 1e-2, "ADMM penalty weight"),
        Option("every", int, None, "steps between re-projections (default: a quarter epoch)"),
        Option("residue", float, 0.01, "fraction of their size pruned slices keep at the end (prox)"),
        Option("pull", float, None, "per-step shrink factor (default: from residue)"),
        *SPARSITY_TRAINING_OPTIONS)

    def run(self, program: Program) -> PassResult:
        default_kinds(program, ("heads", "head_dim", "mlp"))
        ranking = str(self.options.get("ranking", "markov"))
        edge = str(self.options.get("edge", "cka"))
        if ranking not in ("markov", "norm"):
            raise VitccError(f"gohsp{{ranking={ranking}}}: expected markov or norm")
        if edge not in ("cka", "pearson"):
            raise VitccError(f"gohsp{{edge={edge}}}: expected cka or pearson")
        epochs = epochs_of(program, self.options, default=0)
        info: dict = {"ranking": ranking, "edge": edge, "epochs": epochs}
        if epochs > 0:
            train_loader(program, "gohsp", "its ADMM sparsity-training stage")
        if ranking == "markov":
            x = calibration(program, "gohsp")
            layers, weights = head_graph(program, x, edge=edge)
            if len(layers) < 2:
                raise VitccError("gohsp's Markov head ranking needs at least two attention layers; "
                                 "use gohsp{ranking=norm} for this model")
            direction = str(self.options.get("direction", "both"))
            if direction not in ("both", "forward", "backward"):
                raise VitccError(f"gohsp{{direction={direction}}}: expected both, forward or backward")
            scores = markov_ranking(layers, weights, float(self.options.get("alpha", 0.85)), direction)
            cache: dict = {}
            for g, _ in layers:  # heads a one-way chain leaves tied: broken by their weight norm (1e-5 of the mean)
                norm = group_norms(program, g, 2.0, cache).sqrt()
                scores[g.name] = scores[g.name] + 1e-5 * scores[g.name].mean() * norm / norm.max().clamp_min(1e-30)
            info["layers"] = len(layers)
            program.report["gohsp"] = {"edge": edge, "edge_weight_mean": [float(w.mean()) for w in weights],
                                       "head_scores": {n: [float(v) for v in s] for n, s in scores.items()}}
        else:
            cache: dict = {}
            scores = {g.name: group_norms(program, g, 2.0, cache).sqrt() for g in program.groups if g.kind == "heads"}
        for name, s in scores.items():
            claim(program, "gohsp", name, s)
        fill_fallback(program, "gohsp")
        if epochs > 0:
            admm = self._admm(program, epochs, set(scores))
            info.update(admm)
            program.report.setdefault("gohsp", {})["admm"] = admm
        return PassResult(info=info)

    def _admm(self, program: Program, epochs: int, head_groups: set[str]) -> dict:
        """Stage 2: sparsity training towards the structured-sparse set select would produce at the budget.

        The target set: heads fixed by the ranking; every other pruned group (head dims, MLP neurons, ...)
        keeps its count and re-chooses its members by norm every `every` steps (default: a quarter epoch).
        `stage2=prox` (default): after every optimizer step the slices outside the target set shrink by the
        factor (1 - pull), pull chosen so that they keep `residue` (1%) of their size by the end (a proximal
        step of a growing group penalty, outside Adam's normalisation). `stage2=admm`: the penalty
        `rho/2 ||W - Z + U||^2` in the loss, Z = projection of W + U onto the set, U += W - Z at each
        projection (with Adam and short budgets it moves the weights little: see the benchmark).
        """
        mode = str(self.options.get("stage2", "prox"))
        if mode not in ("prox", "admm"):
            raise VitccError(f"gohsp{{stage2={mode}}}: expected prox or admm")
        rho = float(self.options.get("rho", 1e-2))
        keep = provisional_keep(program)
        pruned = [g for g in program.groups if g.name in keep and len(keep[g.name]) < g.size]
        if not pruned:
            return {"stage2": "nothing to prune at this budget"}
        with on_device(program.gm, training_device(program)):  # masks, Z and U live where the weights train
            state, history, masks, W, names = self._train_stage2(program, epochs, head_groups, keep, pruned, mode, rho)
        masks = {n: m.cpu() for n, m in masks.items()}
        pull, every = state["pull"], state["every"]
        final = {n: p.detach() for n, p in program.gm.named_parameters()}
        for g in pruned:
            if g.name in head_groups:
                continue
            e = group_energy(program, g, final).sqrt()
            support = torch.zeros(g.size, dtype=torch.float64)
            support[torch.as_tensor(state["keep"][g.name], dtype=torch.long)] = 1.0
            claim(program, "gohsp", g.name, support + e / e.max().clamp_min(1e-30) * 0.5)
        rebase(program)
        last = param_masks(program, state["keep"])
        removed = sum(float((W[n].detach() * ~last.get(n, masks[n]).to(W[n].device)).pow(2).sum()) for n in names)
        total = sum(float(W[n].detach().pow(2).sum()) for n in names)
        return {"stage2": mode, "rho": rho if mode == "admm" else None, "pull": pull if mode == "prox" else None,
                "projections": state["updates"], "every": every,
                "energy_outside_support": removed / max(total, 1e-30), "loss": history.get("loss")}

    def _train_stage2(self, program: Program, epochs: int, head_groups: set[str], keep: dict, pruned: list,
                      mode: str, rho: float):
        """The sparsity training of stage 2 (see `_admm`), with the weights wherever they are now."""
        masks = param_masks(program, keep)
        params = dict(program.gm.named_parameters())
        names = sorted(masks)
        W = {n: params[n] for n in names}
        Z = {n: W[n].detach() * masks[n] for n in names}
        U = {n: torch.zeros_like(W[n]) for n in names}
        steps = len(train_loader(program, "gohsp", "its sparsity-training stage"))
        every = max(1, int(self.options.get("every", max(1, steps // 4))))
        residue = float(self.options.get("residue", 0.01))
        pull = float(self.options.get("pull", 1.0 - residue ** (1.0 / max(1, epochs * steps))))
        state = {"step": 0, "keep": dict(keep), "masks": masks, "updates": 0, "pull": pull, "every": every}

        def project(source: dict[str, torch.Tensor]) -> None:
            new_keep = dict(state["keep"])
            for g in pruned:
                if g.name in head_groups:
                    continue  # heads: the ranking decides (the soft guide of stage 1)
                e = group_energy(program, g, source)
                k = len(keep[g.name])
                new_keep[g.name] = np.sort(torch.argsort(e, descending=True, stable=True)[:k].numpy())
            state["keep"] = new_keep
            state["masks"] = {**masks, **param_masks(program, new_keep)}
            state["updates"] += 1

        def penalty(_model):
            return 0.5 * rho * sum(((W[n] - Z[n] + U[n]) ** 2).sum() for n in names)

        def on_step(_model):
            state["step"] += 1
            if mode == "prox":
                for n in names:
                    W[n].mul_(torch.where(state["masks"][n], 1.0, 1.0 - pull).to(W[n].dtype))
                if state["step"] % every == 0:
                    project({n: W[n].detach() for n in names})
                return
            if state["step"] % every:
                return
            V = {n: W[n].detach() + U[n] for n in names}
            project(V)
            for n in names:
                Z[n] = V[n] * state["masks"][n]
                U[n] += W[n].detach() - Z[n]

        history = sparsity_train(program, "gohsp", self.options, epochs=epochs,
                                 extra_loss=penalty if mode == "admm" else None, on_step=on_step,
                                 label="gohsp stage 2")
        return state, history, masks, W, names
