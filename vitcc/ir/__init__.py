"""The IR: `Program` (a captured graph, its analyses, scores and selection), `Selection`, and the channel
types both are written in. Plain data at the bottom of vitcc: nothing here imports another vitcc package."""
