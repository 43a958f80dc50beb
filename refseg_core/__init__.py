"""refseg_core: the vocabulary every stage shares.

Dataset reader (`refer`), synthetic data (`synthetic`), transforms, metrics, feature spec, noise
schedule, errors (every user error, the cache's included, lives in `errors`). The backbones
(`refseg.backbones`) import diffusers/transformers and are never imported from here, so heads run
where only torch and zarr exist.
"""

from refseg.core.errors import (  # noqa: F401
    CacheError,
    CacheMismatchError,
    CacheNotFoundError,
    CacheWriteError,
    DataError,
    IncompleteCacheError,
    ModelError,
    NewerFormatError,
    NonFiniteError,
    RefsegError,
    RunError,
    UnsafePickleError,
)
from refseg.core.feature_spec import FeatureSpec, TensorInfo  # noqa: F401

__version__ = "0.1.0"
