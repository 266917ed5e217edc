import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# test helpers (peft_reference, redis_server, ...) import as top-level modules from any test directory
sys.path.insert(0, str(Path(__file__).parent))

from redis_server import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A redis-server of the tests' own on a free port; `make install` installs the binary."""
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed: run `make install` (Debian package redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url
