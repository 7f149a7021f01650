"""flashmoe.workers."""
