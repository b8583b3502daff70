"""`llm serve`: the OpenAI- and Ollama-compatible HTTP server (routes, protocol conversion, metrics, grammars)."""
