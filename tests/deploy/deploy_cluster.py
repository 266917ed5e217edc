"""The deployment topology on loopback: `python -m server` replicas and Debian's nginx on docker/nginx.conf."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from render_nginx import NGINX_CONF, REPO, render, upstream_addresses


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path) -> str:
    return path.read_text(errors="replace")[-4000:] if path.exists() else ""


class Replica:
    """One `python -m server` on a free loopback port, sharing the task store at `store`."""

    def __init__(self, name: str, workdir: Path, *, store: str, env: dict[str, str]) -> None:
        self.name = name
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"
        self.log_path = workdir / f"{name}.log"
        self.args = [sys.executable, "-m", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        self.args += ["--store", store, "--device", "cpu", "--max-batch-size", "8"]
        self.env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), **env}
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(self.args, cwd=REPO, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 180.0) -> None:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{_tail(self.log_path)}")
            try:
                if httpx.get(f"{self.url}/ready", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} was not ready within {timeout} s:\n{_tail(self.log_path)}")

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, the port closes at once (a crashed replica)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def nginx_binary() -> str:
    found = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
    if found is None:
        raise RuntimeError("nginx is not installed: run `make install` (Debian package nginx)")
    return found


class Nginx:
    """Debian's nginx in the foreground on the repository's docker/nginx.conf, rendered for `replicas`.

    The i-th upstream address of the file (server1:8000, server2:8000) becomes the i-th replica's address.
    Its logs (stderr: error log, stdout: access log) go to files in `prefix`.
    """

    def __init__(self, prefix: Path, replicas: list[Replica]) -> None:
        conf = NGINX_CONF.read_text()
        names = upstream_addresses(conf)
        if len(names) != len(replicas):
            raise ValueError(f"docker/nginx.conf has upstream servers {names}, the test has {len(replicas)} replicas")
        self.prefix = prefix
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.servers = {name: replica.address for name, replica in zip(names, replicas)}
        self.conf_path = prefix / "nginx.conf"
        self.conf_path.write_text(render(conf, servers=self.servers, listen=f"127.0.0.1:{self.port}", prefix=prefix))
        (prefix / "temp").mkdir(exist_ok=True)
        main = f"daemon off; pid {prefix / 'nginx.pid'};"
        if os.geteuid() == 0:
            main += " user root;"  # else workers run as nobody, who cannot enter the private temp dirs
        self.args = [nginx_binary(), "-p", str(prefix), "-c", str(self.conf_path), "-e", "stderr", "-g", main]
        self.error_log = prefix / "error.log"
        self.access_log = prefix / "access.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> None:
        with open(self.access_log, "wb") as out, open(self.error_log, "wb") as err:
            self.process = subprocess.Popen(self.args, stdout=out, stderr=err)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{_tail(self.error_log)}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nginx did not listen within {timeout} s:\n{_tail(self.error_log)}")

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # fast shutdown of the master and its workers
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
