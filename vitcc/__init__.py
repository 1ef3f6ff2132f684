"""vitcc: a structured-pruning compiler for vision transformers, with verified equivalence."""
from .api import CompileResult, compile, load, save
from .coupling import RULES, rule
from .errors import VerificationError, VitccError
from .ir import Program
from .pipeline import Insertion, Option, Pass, PassRegistry, PassResult, register_pass

__all__ = ["compile", "load", "save", "CompileResult", "Program", "Pass", "PassResult", "Insertion", "Option",
           "PassRegistry", "register_pass", "rule", "RULES", "VitccError", "VerificationError"]
__version__ = "0.1.0"
