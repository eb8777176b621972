"""FastAPI server: WebSocket streaming, REST control, metrics and the browser page (see docs/server.md)."""
