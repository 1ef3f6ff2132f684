"""Further CLI commands, one module each: each does `from vitcc.cli import app` and `@app.command(...)`.

vitcc.cli imports every module of this package, so adding a command is adding a file here.
"""
