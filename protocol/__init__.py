"""flashmoe.protocol."""
