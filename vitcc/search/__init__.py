"""The budget search: cost models (params, MACs, latency), loss models (scores, measured output change), and
the one search that picks a selection under a budget."""
