"""Groups: what users see of the analysis. One group per prunable leaf space, with its members."""
from __future__ import annotations

import re

from vitcc.ir.groups import Group, Member
from vitcc.ir.types import Coupling, is_ttype
from vitcc.ir.spaces import Space, find, leaves, spaces_of

_SUFFIX = {"residual": "residual", "heads": "heads", "mlp": "hidden", "rank": "rank", "other": "channels"}


def build_groups(c: Coupling) -> list[Group]:
    """Leaf spaces that carry activations and parameters, in parameter order, with stable names."""
    activations = {n.name for n in c.gm.graph.nodes if n.op != "get_attr"}
    live = {find(s).id for name, t in c.types.items() if name in activations and is_ttype(t) for s in spaces_of(t)}
    for copies in c.aliases.values():
        live |= {find(s).id for s in copies}
    found: dict[int, tuple[Space, list[Member], set]] = {}  # root -> (space, members, their (param, axis))
    first_use = {}
    for i, n in enumerate(c.gm.graph.nodes):
        for a in n.all_input_nodes:
            if a.op == "get_attr":
                first_use.setdefault(a.target, i)
    order = sorted(c.params, key=lambda p: first_use.get(p, len(first_use)))
    for pname in order:  # in the order the graph uses them: stable names, as the model reads
        t = c.params[pname]
        for axis, ax in enumerate(t):
            for f in ax:
                for leaf in leaves(f):
                    r = find(leaf)
                    if r.fixed or r.id not in live:
                        continue
                    entry = found.setdefault(r.id, (r, [], set()))
                    if (pname, axis) not in entry[2]:
                        entry[1].append(Member(pname, axis))
                        entry[2].add((pname, axis))
    params = {name for name, _ in c.gm.named_parameters()}
    groups, used = [], set()
    for r, members, _ in found.values():
        if not any(m.param in params for m in members):
            continue  # only buffers (a shift mask, an index table): sizes, not channels
        kind = _kind(r, members)
        name = _name(kind, r, members)
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}#{k}"
        used.add(name)
        groups.append(Group(name, kind, r.size, members, r.frozen, r))
    residual = [g for g in groups if g.kind == "residual"]
    if len(residual) > 1:  # hierarchical models: one residual stream per stage, in order
        for i, g in enumerate(residual):
            g.name = f"residual.{i}"
    return groups


def _kind(r: Space, members: list[Member]) -> str:
    if "heads" in r.tags:
        return "heads"
    if r.tags & {"head_dim_qk", "head_dim_v"}:
        return "head_dim"
    if "normalized" in r.tags:
        return "residual"
    if "rank" in r.tags:  # the inner width of a factorised linear (lowrank's down -> up): not neurons
        return "rank"
    axes = {m.axis for m in members if m.param.endswith("weight")}
    return "mlp" if {0, 1} <= axes else "other"


def _name(kind: str, r: Space, members: list[Member]) -> str:
    paths = [m.param.split(".")[:-1] for m in members]
    prefix = common_prefix(paths)
    in_module = all(m.param.rpartition(".")[2] in ("weight", "bias") for m in members)
    if kind in ("heads", "head_dim") and len({".".join(p) for p in paths}) == 1 and prefix and in_module:
        prefix = prefix[:-1]  # all of it lives in one projection (fused qkv): name it after the block
        # (nn.MultiheadAttention's in_proj_weight is the attention's own parameter: named after it already)
    if kind == "head_dim":
        suffix = "qk_dim" if "head_dim_qk" in r.tags else "v_dim"
    else:
        suffix = _SUFFIX[kind]
    return ".".join(prefix + [suffix])


_NUMBERED = re.compile(r"(^|_)\d+$")  # a numbered child module: blocks.3, layers.1, encoder_layer_0


def model_blocks(groups: list[Group]) -> tuple[list[dict], dict[str, str | None]]:
    """The model's blocks in model order, each with its stage, and the block of every group (None: stem, head).

    Reports draw the model block by block, and the groups only name parameters, so the structure is read
    off the names once, here: a block is the deepest numbered module that holds an attention (a `heads`
    group; an MLP where a model has none) and owns every group named under it. Its stage is the run of
    blocks that read one residual stream (the residual group with most parameters in the block): one
    stage for ViT, one per resolution for Swin."""
    def numbered(name: str) -> str:
        parts = name.split(".")
        last = max((i for i, p in enumerate(parts) if _NUMBERED.search(p)), default=-1)
        return ".".join(parts[:last + 1])
    anchors = [g for g in groups if g.kind == "heads"] or [g for g in groups if g.kind == "mlp"]
    names = {numbered(g.name) for g in anchors}
    block_of: dict[str, str | None] = {}
    for g in groups:
        inside = [b for b in names if b == "" or g.name.startswith(b + ".")]
        block_of[g.name] = max(inside, key=len) if inside and g.kind != "residual" else None
    order = list(dict.fromkeys(b for b in block_of.values() if b is not None))
    residual = [g for g in groups if g.kind == "residual"]
    blocks, stage, previous = [], -1, object()
    for b in order:
        reads = {r.name: sum(m.param.startswith(b + ".") or b == "" for m in r.members) for r in residual}
        stream = max(reads, key=reads.get) if reads and max(reads.values()) > 0 else None
        if stream != previous:
            stage, previous = stage + 1, stream
        blocks.append({"name": b, "stage": stage, "residual": stream})
    return blocks, block_of


def common_prefix(paths: list[list[str]]) -> list[str]:
    """The longest leading run of parts that every path (a module path split at dots) shares."""
    prefix = paths[0]
    for p in paths[1:]:
        n = 0
        while n < min(len(prefix), len(p)) and prefix[n] == p[n]:
            n += 1
        prefix = prefix[:n]
    return prefix
