"""Render docker/nginx.conf for a proxy on loopback, changing only what must differ from the compose setup.

Three edits, nothing else: the address of every upstream `server NAME:PORT ...;` line (compose service names
become loopback addresses; the parameters after the address stay), the port of the `listen` line, and
`*_temp_path` directives under the test's own prefix (Debian's compiled-in /var/lib/nginx needs root).
"""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "docker" / "nginx.conf"

# `server name:port;` inside an upstream block; `server {` (a virtual server) has no address and never matches.
_UPSTREAM_SERVER = re.compile(r"^(\s*server\s+)([^\s;{]+)", re.MULTILINE)
_LISTEN = re.compile(r"^(\s*listen\s+)[^;]+;", re.MULTILINE)
_HTTP = re.compile(r"^http\s*\{\n", re.MULTILINE)
_TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def upstream_addresses(conf: str) -> list[str]:
    """Every distinct upstream server address, in order of first appearance."""
    return list(dict.fromkeys(m.group(2) for m in _UPSTREAM_SERVER.finditer(conf)))


def render(conf: str, *, servers: dict[str, str], listen: str, prefix: Path) -> str:
    """`conf` with upstream addresses mapped through `servers`, listening on `listen`, temp paths in `prefix`."""
    unknown = set(upstream_addresses(conf)) - servers.keys()
    if unknown:
        raise ValueError(f"no loopback address for upstream servers {sorted(unknown)}")
    conf = _UPSTREAM_SERVER.sub(lambda m: m.group(1) + servers[m.group(2)], conf)
    conf, listens = _LISTEN.subn(lambda m: f"{m.group(1)}{listen};", conf)
    if listens != 1:
        raise ValueError(f"expected one listen directive, found {listens}")
    temp = "".join(f"    {name}_temp_path {prefix / 'temp' / name};\n" for name in _TEMP_PATHS)
    conf, https = _HTTP.subn(lambda m: m.group(0) + temp, conf)
    if https != 1:
        raise ValueError("expected one `http {` block")
    return conf
