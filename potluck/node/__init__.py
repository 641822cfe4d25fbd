"""The node daemon: lifecycle, identity, the OpenAI-compatible HTTP API, the router and metrics."""
