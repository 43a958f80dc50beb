"""Light heads trained and evaluated from the cache alone: `refseg-train-head`, `refseg-eval`.

```python
from refseg.heads import HEADS, build_head, train, evaluate
train("train.zarr", 5, "vpd", "runs/vpd-t5", val_cache="val.zarr", epochs=10)
evaluate("runs/vpd-t5", "testA.zarr")   # {"P@0.5": ..., "oIoU": ..., "mIoU": ..., "n": ...}
```
Never imports diffusers, transformers or `extract`: a head trains where only torch and zarr exist.
"""

from refseg.heads.registry import HEADS, _load_builtin_heads, build_head, register_head  # noqa: F401

_load_builtin_heads()
from refseg.heads.evaluate import evaluate, predict  # noqa: E402,F401
from refseg.heads.train import train  # noqa: E402,F401

__all__ = ["HEADS", "build_head", "register_head", "train", "evaluate", "predict"]
