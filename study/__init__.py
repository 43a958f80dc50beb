"""Studies that use every stage at once (the demo, report figures).

Sits above `extract` and `heads` (like `tests`): it may import both, they never import it
(docs/DESIGN.md §2). The whole-pipeline demo needs such a layer because `extract` and `heads` must
not import each other.
"""
