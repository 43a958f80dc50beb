"""Light heads trained and evaluated from the cache alone: `refseg-train-head`, `refseg-eval`.

```python
from refseg.heads import HEADS, build_head, train, evaluate
train("train.zarr", 5, "vpd", "runs/vpd-t5", val_cache="val.zarr", epochs=10)
evaluate("runs/vpd-t5", "testA.zarr")   # {"P@0.5": ..., "oIoU": ..., "mIoU": ..., "n": ...}
```
Never imports diffusers, transformers or `extract`: a head trains where only torch and zarr exist.
"""

from refseg.heads.base import Head
from refseg.heads.registry import HEADS, build_head, register_head

# The built-in heads: importing their modules registers them, here and only here.
from refseg.heads import film, film_attend, film_up, linear, simple_pyramid, vpd  # noqa: F401  isort:skip

from refseg.heads.evaluate import evaluate, predict
from refseg.heads.train import train

__all__ = ["HEADS", "Head", "build_head", "register_head", "train", "evaluate", "predict"]
