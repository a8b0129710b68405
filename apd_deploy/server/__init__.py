"""`apd-deploy serve`: an OpenAI-compatible HTTP server on the batched scheduler (FastAPI, uvicorn,
prometheus_client). `create_app` builds the app for a loaded runtime; `serve` runs it."""
