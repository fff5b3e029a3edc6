"""An OpenAI-compatible LLM server with a continuous-batching engine loop (see server.py)."""
