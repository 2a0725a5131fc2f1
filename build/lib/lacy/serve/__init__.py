"""The cascade as an OpenAI-compatible service (no Ray: `services/` deploys it)."""
