"""flashmoe.orchestrator."""
