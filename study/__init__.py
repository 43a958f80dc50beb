"""Studies that use every stage at once (the demo, report figures).

Sits above `extract` and `heads` (like `tests`): it may import both, they never import it. DESIGN §2
lists no such package; the whole-pipeline demo needs one because `extract` and `heads` must not
import each other.
"""
