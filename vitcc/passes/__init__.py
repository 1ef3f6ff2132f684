"""Built-in passes, one file each. Importing this package registers them (vitcc.passes)."""
from vitcc.passes import analyze, dce, fold, lamp, magnitude, random_score, rewrite, select, verify  # noqa: F401
from vitcc.passes import taylor  # noqa: F401,E402  (baseline: first-order Taylor, needs calibration data)
from vitcc.passes import dimap, gohsp, lowrank, vtp  # noqa: F401,E402  (the four papers' methods, issue 5; README "Methods")
