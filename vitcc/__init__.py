"""vitcc: a structured-pruning compiler for vision transformers, with verified equivalence."""
from .api import CompileResult, compile, load, rule, save
from .errors import VerificationError, VitccError
from .ir import Program
from .ops import OpInfo, OpTable, default_table
from .pipeline import Insertion, Option, Pass, PassRegistry, PassResult, register_pass

__all__ = ["compile", "load", "save", "rule", "CompileResult", "Program", "Pass", "PassResult", "Insertion", "Option",
           "PassRegistry", "register_pass", "OpTable", "OpInfo", "default_table", "VitccError", "VerificationError"]
__version__ = "0.1.0"
