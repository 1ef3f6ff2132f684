"""Built-in passes, one file each. Importing this package registers them (vitcc.passes)."""
from . import analyze, dce, fold, lamp, magnitude, random_score, rewrite, select, verify  # noqa: F401
from . import taylor  # noqa: F401,E402  (baseline: first-order Taylor, needs calibration data)
from . import dimap, gohsp, lowrank, vtp  # noqa: F401,E402  (the four papers' methods, issue 5; README "Methods")
