"""docs/quickstart.md, then the README's curl examples, run as written, in order, against a live `make serve`.

Two changes, both stated in the quick start itself: the server is `make serve ARGS="--port P --store memory://"`
(a free port, and tasks kept in memory), reached through `TASKSERVE_URL`; training runs `--steps 1` instead of 30, so
this checks that every command works, not the numbers. A command shown with `# error: ...` after it must fail with
that message; every other command must succeed. Commands run in a scratch directory (data/ and out/ land there).
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "docs" / "quickstart.md"
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w+)\n(.*?)^```", re.MULTILINE | re.DOTALL)
STEPS = 1


def code_blocks(path: Path) -> list[tuple[str, str]]:
    """(language, text) of every fenced block meant to be run: `sh` and `python`."""
    return [(m[1], m[2]) for m in FENCE.finditer(path.read_text()) if m[1] in ("sh", "python")]


def commands(block: str) -> list[tuple[str, list[str]]]:
    """Each command of a shell block (continuation lines joined), with the comment lines shown after it."""
    found: list[tuple[str, list[str]]] = []
    pending = ""
    for line in block.splitlines():
        if pending:
            pending += " " + line.strip()
        elif line.startswith("#"):
            if found:
                found[-1][1].append(line)
            continue
        elif line.strip():
            pending = line
        if pending.endswith("\\"):
            pending = pending[:-1].rstrip()
            continue
        if pending:
            found.append((re.sub(r"\s{2,}#.*$", "", pending), []))  # a comment after a command: two spaces, then #
            pending = ""
    return found


def test_the_commands_are_read_as_written() -> None:
    block = 'taskserve a \\\n    --b 1   # note\n# out 1\n# out 2\necho "a #x"\n'
    assert commands(block) == [("taskserve a --b 1", ["# out 1", "# out 2"]), ('echo "a #x"', [])]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`make serve` as the quick start's first step runs it, on a free port with tasks in memory."""
    port = free_port()
    log = tmp_path_factory.mktemp("quickstart-server") / "server.log"
    args = f"ARGS=--port {port} --store memory://"
    with open(log, "wb") as out:
        process = subprocess.Popen(
            ["make", "--no-print-directory", "serve", args],
            cwd=REPO,
            env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")},
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: make and the server stop together
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while not _ready(url):
            assert process.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/ready", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A scratch directory that looks like the checkout to the commands: .venv and clients/ are links to it."""
    work = tmp_path_factory.mktemp("quickstart")
    for name in (".venv", "clients"):
        (work / name).symlink_to(REPO / name)
    return work


def run_block(language: str, block: str, *, cwd: Path, env: dict[str, str], url: str) -> None:
    if language == "python":
        result = subprocess.run([sys.executable, "-"], input=block, cwd=cwd, env=env, capture_output=True, text=True)
        assert result.returncode == 0, f"{block}\n{result.stderr}"
        return
    for command, shown in commands(block):
        if command.startswith("make serve"):
            continue  # the `server` fixture runs it
        command = command.replace("--steps 30", f"--steps {STEPS}").replace("localhost:8000", url.split("//")[1])
        result = subprocess.run(
            ["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, stdin=subprocess.DEVNULL
        )
        expected = next((line.removeprefix("# error: ") for line in shown if line.startswith("# error: ")), None)
        if expected is None:
            assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
        else:
            assert result.returncode != 0 and expected.split(" (")[0] in result.stderr, f"{command}\n{result.stderr}"


def test_the_quickstart_then_the_readme_run_as_written(server: str, workdir: Path) -> None:
    env = {
        **os.environ,
        "TASKSERVE_URL": server,
        "PATH": f"{workdir / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    env.pop("TASKSERVE_API_KEY", None)
    blocks = code_blocks(QUICKSTART)
    assert len(blocks) >= 8 and blocks[0][1].startswith("make serve")
    for language, block in blocks:
        run_block(language, block, cwd=workdir, env=env, url=server)
    readme = [(lang, block) for lang, block in code_blocks(README) if block.startswith("curl")]
    assert readme, "the README's curl examples"
    for language, block in readme:
        run_block(language, block, cwd=workdir, env=env, url=server)
