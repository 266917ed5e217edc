"""`python -m server`: settings from env `TASKSERVE_*` and the same names as CLI flags (`--help`).

The port opens at once (uvicorn logs "Uvicorn running on ..." when it does) and the model loads in the background;
"ready: serving ..." is logged when requests can be served. If start-up fails, the server stops with status 1.
"""

from __future__ import annotations

import logging
import sys

import uvicorn

from adapters_store import redacted
from server.app import create_app
from server.config import Settings


def main() -> None:
    settings = Settings(_cli_parse_args=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("taskserve").info(
        "starting on http://%s:%d: model %s, tasks in %s",
        settings.host,
        settings.port,
        settings.model,
        redacted(settings.store),
    )
    server: uvicorn.Server | None = None

    def stop() -> None:
        if server is not None:
            server.should_exit = True

    app = create_app(settings, on_failure=stop)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="info",
        proxy_headers=True,
        forwarded_allow_ips=settings.trusted_proxies,
    )
    server = uvicorn.Server(config)
    try:
        server.run()
    except KeyboardInterrupt:  # uvicorn re-raises the Ctrl-C it shut down gracefully for, as uvicorn.run swallows it
        pass
    if not server.started or app.state.startup.error is not None:
        sys.exit(1)


if __name__ == "__main__":
    main()
