"""Built-in passes, one file each. Importing this package registers them (vitcc.passes)."""
from . import analyze, dce, fold, lamp, magnitude, random_score, rewrite, select, verify  # noqa: F401
