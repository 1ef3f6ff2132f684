"""verify: the compact model must compute what the masked original computes, on every compile.

Compared on the example input and on fresh random inputs of the same shape, on every output tensor
(dicts, tuples, dataclasses, HF outputs) and on the residual stream and its branches inside the model
(`vitcc.reference.verification`): a zero-initialised classifier cannot make a wrong rewrite pass. With nothing
removed the masked reference is the original model, so this also checks that an unpruned rewrite is the
identity.
"""
from __future__ import annotations

from vitcc.ir.program import Program
from vitcc.pipeline.pass_base import Option, Pass, PassResult, register_pass
from vitcc.reference.verification import verify


@register_pass("verify", kind="structural")
class Verify(Pass):
    """Check compact(x) == masked(x) on the example input and fresh random inputs."""
    writes_weights = False  # reads weights only (Pass.writes_weights)
    options_spec = (Option("trials", int, 2, "inputs compared: the example input and trials-1 random ones"),
                    Option("rtol", float, 1e-4, "relative tolerance (of the reference's largest magnitude)"),
                    Option("atol", float, 1e-5, "absolute tolerance"),
                    Option("seed", int, 0, "seed of the random inputs"))

    def run(self, program: Program) -> PassResult:
        report = verify(program, program.keep_by_root(), trials=int(self.option("trials")),
                        rtol=float(self.option("rtol")), atol=float(self.option("atol")),
                        seed=int(self.option("seed")))
        return PassResult(modified=False, info={"max_abs_error": program.report["max_abs_error"],
                                                "worst": report["worst"]})
