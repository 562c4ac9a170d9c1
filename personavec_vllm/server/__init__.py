"""OpenAI-compatible HTTP surface: request fields, vector endpoints, metrics."""
