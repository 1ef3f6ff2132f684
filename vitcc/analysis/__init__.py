"""The analysis: the op table, the coupling analyzer that types every node with it, groups of coupled
channels, and residual branches as structure."""
