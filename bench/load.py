"""Load test: many concurrent clients, streamed and not, some leaving early; what overload looks like to them.

    python bench/load.py                        # starts its own server (default model, tasks in memory)
    python bench/load.py --clients 200 --duration 60 --server-flag=--max-queue-wait=5
    python bench/load.py --url http://127.0.0.1:8000 --pid 1234   # a server already running on this machine

Each client sends generations back to back until the time is up: half streamed (server-sent events), a share of
those closed after the first token (a client that leaves), the rest plain JSON. A 429 is counted and honoured
(the client waits its Retry-After, capped at 5 s). Meanwhile /health and /ready are probed 4 times a second, from
a process of their own, on the main port and on the probe port (`probe_port`).
It prints, for the run: requests by outcome (errors by type), latency percentiles of the answered ones (whole
request, and time to first token when streamed), the probes' latency, tokens/s and the server's peak RSS.

Loopback only: it refuses any other address. Bounded in time: `--duration`, then at most `--drain` seconds for the
requests in flight.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
PROBES = ("/health", "/ready")
PROMPTS = (
    "Once upon a time",
    "The capital of France is",
    "Write one sentence about rivers.",
    "name[The Eagle] eatType[coffee shop] food[Chinese] area[riverside]",
    "List three colours:",
)


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)
    latency: list[float] = field(default_factory=list)  # answered requests, seconds
    first_token: list[float] = field(default_factory=list)  # streamed requests, seconds
    refused: list[float] = field(default_factory=list)  # 429s: how long the refusal took
    probes: dict[str, list[float]] = field(default_factory=dict)
    probe_failures: Counter = field(default_factory=Counter)
    tokens: int = 0


async def one_request(client: httpx.AsyncClient, rng: random.Random, args, tally: Tally) -> float:
    """Send one generation; return how long to wait before the next (a 429's Retry-After)."""
    body = {"prompt": rng.choice(PROMPTS), "max_new_tokens": args.max_new_tokens}
    streamed = rng.random() < args.stream_share
    leave = streamed and rng.random() < args.leave_share
    started = time.perf_counter()
    try:
        if not streamed:
            response = await client.post("/v1/tasks/base/generate", json=body)
            return _record(response, started, tally, tokens=lambda: response.json()["usage"]["completion_tokens"])
        async with client.stream("POST", "/v1/tasks/base/generate", json={**body, "stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                return _record(response, started, tally)
            first = None
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if first is None:
                    first = time.perf_counter() - started
                    tally.first_token.append(first)
                    if leave:
                        tally.outcomes["left after the first token"] += 1
                        return 0.0
                tally.tokens += len(event.get("token_ids", []))
            tally.outcomes["200"] += 1
            tally.latency.append(time.perf_counter() - started)
    except httpx.TimeoutException:
        tally.outcomes["timeout"] += 1
    except httpx.TransportError as exc:
        tally.outcomes[type(exc).__name__] += 1
    return 0.0


def _record(response: httpx.Response, started: float, tally: Tally, tokens=None) -> float:
    elapsed = time.perf_counter() - started
    status = response.status_code
    if status == 200:
        tally.outcomes["200"] += 1
        tally.latency.append(elapsed)
        tally.tokens += tokens() if tokens is not None else 0
        return 0.0
    kind = response.json().get("error", {}).get("type", "?") if response.content else "?"
    tally.outcomes[f"{status} {kind}"] += 1
    if status == 429:
        tally.refused.append(elapsed)
        return min(5.0, float(response.headers.get("retry-after", "1")))
    return 0.0


async def client_loop(url: str, seed: int, args, tally: Tally, deadline: float) -> None:
    rng = random.Random(seed)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout) as client:
        while time.monotonic() < deadline:
            pause = await one_request(client, rng, args, tally)
            if pause:
                await asyncio.sleep(min(pause, max(0.0, deadline - time.monotonic())))


def probe_process(targets: dict[str, str], seconds: float, results) -> None:
    """GET each target 4 times a second, from a process of its own: the clients' event loop and GIL, busy with
    200 streams, must not delay the probes' own timing."""
    latencies: dict[str, list[float]] = {name: [] for name in targets}
    failures: Counter = Counter()
    deadline = time.monotonic() + seconds
    with httpx.Client(timeout=10.0) as client:
        while time.monotonic() < deadline:
            for name, url in targets.items():
                started = time.perf_counter()
                try:
                    response = client.get(url)
                    latencies[name].append(time.perf_counter() - started)
                    if response.status_code != 200:
                        failures[f"{name} {response.status_code}"] += 1
                except httpx.HTTPError as exc:
                    failures[f"{name} {type(exc).__name__}"] += 1
            time.sleep(0.25)
    results.put((latencies, dict(failures)))


async def rss_loop(pid: int | None, peak: list[int], deadline: float) -> None:
    if pid is None:
        return
    process = psutil.Process(pid)
    while time.monotonic() < deadline:
        try:
            peak[0] = max(peak[0], process.memory_info().rss)
        except psutil.Error:
            return
        await asyncio.sleep(0.5)


async def run(url: str, pid: int | None, args) -> tuple[Tally, int, float]:
    tally, peak = Tally(), [0]
    started = time.monotonic()
    deadline = started + args.duration
    targets = {f"GET {path}": f"{url}{path}" for path in ("/health", "/ready")}
    if args.probe_port:
        targets |= {f"GET {path} on the probe port": f"http://127.0.0.1:{args.probe_port}{path}" for path in PROBES}
    results: multiprocessing.Queue = multiprocessing.Queue()
    prober = multiprocessing.Process(target=probe_process, args=(targets, args.duration, results), daemon=True)
    prober.start()
    workers = [asyncio.create_task(client_loop(url, i, args, tally, deadline)) for i in range(args.clients)]
    rss = asyncio.create_task(rss_loop(pid, peak, deadline))
    done, pending = await asyncio.wait(workers, timeout=args.duration + args.drain)
    for task in pending:
        task.cancel()
    tally.outcomes["cut at the end of the run"] += len(pending)
    await asyncio.gather(rss, *pending, return_exceptions=True)
    tally.probes, failures = await asyncio.to_thread(results.get, True, 60)
    tally.probe_failures.update(failures)
    prober.join(10)
    return tally, peak[0], time.monotonic() - started


def percentile(values: list[float], q: float) -> str:
    if not values:
        return "-"
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:.0f} ms"


def report(tally: Tally, peak_rss: int, seconds: float, args) -> None:
    total = sum(tally.outcomes.values())
    print(f"\n{args.clients} clients for {args.duration:.0f} s ({seconds:.0f} s with the drain), {total} requests")
    print("\n| outcome | requests |\n|---|---|")
    for outcome, count in tally.outcomes.most_common():
        print(f"| {outcome} | {count} |")
    print("\n| latency | p50 | p99 | max |\n|---|---|---|---|")
    rows = [
        ("answered (200), whole request", tally.latency),
        ("streamed, first token", tally.first_token),
        ("refused (429)", tally.refused),
        *tally.probes.items(),
    ]
    for name, values in rows:
        print(f"| {name} | {percentile(values, 0.5)} | {percentile(values, 0.99)} | {percentile(values, 1.0)} |")
    failures = ", ".join(f"{k}: {v}" for k, v in tally.probe_failures.items()) or "none"
    print(f"\nprobe failures: {failures}")
    print(f"tokens generated: {tally.tokens} ({tally.tokens / seconds:.1f}/s)")
    print(f"server peak RSS: {peak_rss / 2**20:.0f} MiB" if peak_rss else "server peak RSS: not measured (no --pid)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(flags: list[str], probe_port: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    command = [sys.executable, "-m", "server", "--port", str(port), "--store", "memory://"]
    command += ["--probe-port", str(probe_port), *flags]
    # OMP_NUM_THREADS passes through: on a machine shared with other work, 1 avoids torch's threads spinning
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit("the server did not become ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="a server on this machine (default: start one)")
    parser.add_argument("--pid", type=int, help="that server's process id, to measure its RSS")
    parser.add_argument("--probe-port", type=int, help="that server's probe port, to probe it too")
    parser.add_argument("--server-flag", action="append", default=[], help="a flag for the server this starts")
    parser.add_argument("--clients", type=int, default=200, help="concurrent clients (default: 200)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load (default: 60)")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds left to requests in flight (default: 30)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="per request (default: 32)")
    parser.add_argument("--stream-share", type=float, default=0.5, help="share of requests streamed (default: 0.5)")
    parser.add_argument("--leave-share", type=float, default=0.2, help="share of streams left early (default: 0.2)")
    parser.add_argument("--timeout", type=float, default=120.0, help="client timeout in seconds (default: 120)")
    args = parser.parse_args()
    process = None
    if args.url is None:
        args.probe_port = args.probe_port or free_port()
        process, url = start_server(args.server_flag, args.probe_port)
        pid = process.pid
    else:
        url, pid = args.url.rstrip("/"), args.pid
        if urlparse(url).hostname not in LOOPBACK:
            raise SystemExit(f"refusing {url}: this load test only runs against a server on this machine")
    try:
        tally, peak, seconds = asyncio.run(run(url, pid, args))
    finally:
        if process is not None:
            process.terminate()
            process.wait(timeout=30)
    report(tally, peak, seconds, args)


if __name__ == "__main__":
    main()
