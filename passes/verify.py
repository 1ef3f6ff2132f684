"""verify: the compact model must compute what the masked original computes, on every compile.

Compared on the example input and on fresh random inputs of the same shape; with nothing removed the
masked reference is the original model, so this also checks that an unpruned rewrite is the identity.
"""
from __future__ import annotations

import torch

from vitcc.errors import VerificationError
from vitcc.ir import Program
from vitcc.masking import masked_reference
from vitcc.pipeline import Option, Pass, PassResult, register_pass


@register_pass("verify", kind="structural")
class Verify(Pass):
    """Check compact(x) == masked(x) on the example input and fresh random inputs."""
    options_spec = (Option("trials", int, 2, "inputs compared: the example input and trials-1 random ones"),
                    Option("rtol", float, 1e-4, "relative tolerance (of the reference's largest magnitude)"),
                    Option("atol", float, 1e-5, "absolute tolerance"),
                    Option("seed", int, 0, "seed of the random inputs"))

    def run(self, program: Program) -> PassResult:
        trials = int(self.option("trials"))
        rtol = float(self.option("rtol"))
        atol = float(self.option("atol"))
        keep = program.keep_by_root()
        gen = torch.Generator().manual_seed(int(self.option("seed")))
        inputs = [program.example_inputs]
        for _ in range(trials - 1):
            inputs.append(tuple(torch.randn(x.shape, generator=gen, dtype=x.dtype) if x.is_floating_point() else x
                                for x in program.example_inputs))
        worst_abs = worst_rel = 0.0
        ok = True
        program.gm.eval()
        reference = masked_reference(program, keep)
        for xs in inputs:
            with torch.no_grad():
                want = reference.run(*xs)
                got = program.gm(*xs)
            err = (got - want).abs().max().item()
            scale = want.abs().max().item()
            worst_abs = max(worst_abs, err)
            worst_rel = max(worst_rel, err / max(scale, 1e-12))
            ok &= err <= atol + rtol * scale
        program.report["max_abs_error"] = worst_abs
        program.report["max_rel_error"] = worst_rel
        if not ok:
            raise VerificationError(f"verification failed: compact differs from masked by {worst_abs:.3g} "
                                    f"(relative {worst_rel:.3g}); nothing was written")
        return PassResult(modified=False, info={"max_abs_error": worst_abs})
