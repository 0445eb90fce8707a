"""The OpenAI-compatible server (`tessera serve`): async engine loop, protocol, FastAPI app, metrics.

Needs the `serve` extras (fastapi, uvicorn, pydantic, prometheus-client); the engine does not."""
