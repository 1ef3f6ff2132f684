"""verify: the compact model must compute what the masked original computes, on every compile.

Compared on the example input and on fresh random inputs of the same shape, on every output tensor
(dicts, tuples, dataclasses, HF outputs) and on the residual stream and its branches inside the model
(`vitcc.verification`): a zero-initialised classifier cannot make a wrong rewrite pass. With nothing
removed the masked reference is the original model, so this also checks that an unpruned rewrite is the
identity.
"""
from __future__ import annotations

from vitcc.ir import Program
from vitcc.pipeline import Pass, PassResult, register_pass
from vitcc.verification import verify


@register_pass("verify", kind="structural")
class Verify(Pass):
    def run(self, program: Program) -> PassResult:
        report = verify(program, program.keep_by_root(), trials=int(self.options.get("trials", 2)),
                        rtol=float(self.options.get("rtol", 1e-4)), atol=float(self.options.get("atol", 1e-5)),
                        seed=int(self.options.get("seed", 0)))
        return PassResult(modified=False, info={"max_abs_error": program.report["max_abs_error"],
                                                "worst": report["worst"]})
