"""flashmoe.shm."""

from flashmoe.shm.pool import ExpertPool, cleanup_stale

__all__ = ["ExpertPool", "cleanup_stale"]
