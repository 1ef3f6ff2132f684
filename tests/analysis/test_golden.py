"""Golden groups: the analysis of deit_tiny must not drift silently (regenerate with `vitcc inspect --json`)."""
import json
from pathlib import Path

from typer.testing import CliRunner

from vitcc.cli import app

GOLDEN = Path(__file__).parents[1] / "data" / "deit_tiny_groups.json"


def test_deit_tiny_groups_match_golden():
    result = CliRunner().invoke(app, ["inspect", "timm:deit_tiny_patch16_224", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    want = json.loads(GOLDEN.read_text())
    assert got == want
    kinds = [g["kind"] for g in got["groups"]]
    assert kinds.count("heads") == 12 and kinds.count("mlp") == 12 and kinds.count("residual") == 1
    assert kinds.count("head_dim") == 24 and not got["frozen"]
    names = [b["name"] for b in got["branches"]]  # every block's attention and MLP, removable
    assert names == [f"blocks.{i}.{r}" for i in range(12) for r in ("attn", "mlp")]
    assert not any(b["frozen"] for b in got["branches"])


def test_swin_tiny_groups_match_golden():
    result = CliRunner().invoke(app, ["inspect", "timm:swin_tiny_patch4_window7_224", "--json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    assert got == json.loads((GOLDEN.parent / "swin_tiny_groups.json").read_text())
    kinds = [g["kind"] for g in got["groups"]]
    assert kinds.count("residual") == 4 and kinds.count("heads") == 12 and not got["frozen"]
    depths = (2, 2, 6, 2)
    assert [b["name"] for b in got["branches"]] == [f"layers.{s}.blocks.{i}.{r}" for s, d in enumerate(depths)
                                                    for i in range(d) for r in ("attn", "mlp")]
