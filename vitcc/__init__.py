"""vitcc: a structured-pruning compiler for vision transformers, with verified equivalence."""
from vitcc.api import CompileResult, compile, load, rule, save
from vitcc.devices import to_device
from vitcc.errors import VerificationError, VitccError
from vitcc.ir.program import Program
from vitcc.analysis.ops import OpInfo, OpTable, default_table
from vitcc.pipeline.manager import Insertion, PassRegistry
from vitcc.pipeline.pass_base import Option, Pass, PassResult, register_pass
from vitcc.version import __version__

__all__ = ["compile", "load", "save", "rule", "CompileResult", "Program", "Pass", "PassResult", "Insertion", "Option",
           "PassRegistry", "register_pass", "OpTable", "OpInfo", "default_table", "VitccError", "VerificationError",
           "to_device"]
