"""dce: drop dead nodes, then the submodules, parameters and buffers nothing uses any more."""
from __future__ import annotations

from vitcc.ir.program import Program
from vitcc.ir.program import is_impure
from vitcc.pipeline.pass_base import Pass, PassResult, register_pass


@register_pass("dce", kind="structural")
class DeadCodeElimination(Pass):
    writes_weights = False  # only removes (Pass.writes_weights)
    def run(self, program: Program) -> PassResult:
        gm = program.gm
        before = len(gm.graph.nodes)
        gm.graph.eliminate_dead_code(is_impure_node=is_impure)
        gm.delete_all_unused_submodules()
        used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        live_modules: set = set()
        removed = 0
        for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
            owner = name.rpartition(".")[0]
            if name in used or any(owner == m or owner.startswith(m + ".") for m in live_modules):
                continue
            mod = gm.get_submodule(owner) if owner else gm
            attr = name.rpartition(".")[2]
            mod._parameters.pop(attr, None)
            mod._buffers.pop(attr, None)
            removed += 1
        gm.recompile()
        return PassResult(modified=before != len(gm.graph.nodes) or removed > 0,
                          info={"nodes_removed": before - len(gm.graph.nodes), "tensors_removed": removed})
