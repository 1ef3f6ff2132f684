"""Passes and the pipeline: `pass_base` (what a pass is; passes import it) and `manager` (resolves pipeline
strings and runs passes with checks in between; it imports the built-in passes)."""
