"""`python -m server`: settings from env `TASKSERVE_*` and the same names as CLI flags (`--help`)."""

from __future__ import annotations

import logging

import uvicorn

from server.app import create_app
from server.config import Settings


def main() -> None:
    settings = Settings(_cli_parse_args=True)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("taskserve").info(
        "model %s, listening on http://%s:%d", settings.model, settings.host, settings.port
    )
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level="info")


if __name__ == "__main__":
    main()
