"""`python -m server` / `streamdiff-server`: start the real-time server."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

logger = logging.getLogger("server")

SERVER_EXTRA_HINT = "the server needs its extra: pip install 'streamdiff-server[server]' (or `make serve`)"


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags and `STREAMDIFF_*` variables, load the model in the background and serve until stopped.

    Returns 1 when the model cannot be loaded (or the server's dependencies are not installed), else 0.
    """
    # Imported here so a clients-only install (`.[client]`) gets a clear message instead of a traceback.
    try:
        from .app import create_app
        from .serve import DrainingServer, configure_logging, configure_threads, uvicorn_config
        from .settings import is_loopback, parse_settings
    except ImportError as error:
        print(f"error: {error}; {SERVER_EXTRA_HINT}", file=sys.stderr)
        return 1
    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    logger.info("torch threads per model thread: %d", configure_threads(settings.threads))
    if settings.insecure and settings.token is None and not is_loopback(settings.host):
        logger.warning("--insecure: listening on %s without a token; anyone who can reach it can stream",
                       settings.host)
        if settings.host_names is not None and not settings.allowed_hosts:
            logger.warning("answering the Host names %s only (against DNS rebinding); name others with "
                           "--allowed-hosts", ", ".join(sorted(settings.host_names)))
    app = create_app(settings)
    server = DrainingServer(uvicorn_config(app, settings), app.state.server, settings.shutdown_timeout_s)
    state = app.state.server

    def stop(reason: str) -> None:
        server.should_exit = True

    state.on_load_failure = stop
    logger.info("serving on http://%s:%d (model %r loads in the background)", settings.host, settings.port,
                settings.load.model)
    server.run()
    return 1 if state.load_error is not None else 0


if __name__ == "__main__":
    sys.exit(main())
