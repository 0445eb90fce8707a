"""Going past what plain attention allows: XL3M segment-wise inference (`long_context="segments"`)
and sparse KV retrieval with a two-tier KV store (`long_context="sparse"`)."""

from tessera.longctx.config import LongContextConfig, SegmentConfig, SparseConfig, resolve_long_context

__all__ = ["LongContextConfig", "SegmentConfig", "SparseConfig", "resolve_long_context"]
