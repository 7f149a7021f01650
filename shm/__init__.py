"""flashmoe.shm."""
