"""refseg_core: the vocabulary every stage shares.

Dataset reader (`refer`), synthetic data (`synthetic`), transforms, metrics, feature spec, noise
schedule, errors. The backbone modules (`backbone`, `tiny`) import diffusers/transformers and are
imported by `extract` alone, never from here, so heads run where only torch and zarr exist.
"""

from refseg.core.errors import (  # noqa: F401
    CacheError,
    CacheMismatchError,
    DataError,
    ModelError,
    NonFiniteError,
    RefsegError,
    RunError,
    UnsafePickleError,
)
from refseg.core.feature_spec import FeatureSpec, TensorInfo  # noqa: F401

__version__ = "0.1.0"
