"""Many tasks on one server: registering, listing and serving thousands of small adapters of mixed kinds.

A handful of real adapters (LoRA, IA³, prompt tuning, prefix tuning, LoHa, a template), saved by PEFT's own
`save_pretrained` on the default model, are uploaded under `--tasks` ids through the task layer (each with its
tensors scaled by a factor of its own, so every version is distinct) to the disk store and/or a private Redis.
Then, on an in-process engine with 32 concurrent clients:

- upload rate against the number already registered;
- memory per registered-but-cold task (Python allocations the registration leaves behind, traced);
- paging through the whole listing;
- a Zipf(1.1) load over all the tasks vs the same load over 32 resident tasks (target >= 0.8x);
- that 32-task load on this server vs on a server holding only those 32 (another process, rounds
  alternating between the two; target >= 0.9x);
- a cold task's first token vs a resident one's, p50 (target within 100 ms).

    python bench/many_tasks.py                                      # 1,000 tasks, disk store, a few minutes
    python bench/many_tasks.py --tasks 10000 --stores disk,redis    # the issue's full run

Each server runs in its own process (`--child`, driven by one JSON command per line on stdin), so what one
holds (its garbage collector's objects, its allocator) never slows the other.
"""

# ruff: noqa: E402

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import bisect
import gc
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import tracemalloc
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers
from peft import IA3Config, LoHaConfig, LoraConfig, PrefixTuningConfig, PromptTuningConfig
from rich.console import Console
from rich.table import Table
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from workload import ROOT, make_prompts  # first: puts the repo and tests/ on the path

# isort: split
from peft_reference import make_adapter, tiny_llama
from redis_server import RedisServer
from serving import peft_files

from adapters_store import open_store
from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.engine import Engine
from server.engine.request import GenerationRequest
from server.engine.residency import Residency
from server.engine.sampling import SamplingParams
from server.tasks import TaskService

console = Console(width=None if sys.stdout.isatty() else 160)
CAUSAL = {"task_type": "CAUSAL_LM"}
# small adapters of each kind: (how peft_reference randomises it, its config); a few to a few hundred KiB each
SMALL = {
    "lora_q_r1": ("lora_qv", LoraConfig(r=1, lora_alpha=2, target_modules=["q_proj"], **CAUSAL)),
    "lora_v_r2": ("lora_qv", LoraConfig(r=2, lora_alpha=4, target_modules=["v_proj"], **CAUSAL)),
    "ia3_v": ("ia3", IA3Config(target_modules=["v_proj"], feedforward_modules=[], **CAUSAL)),
    "prompt_4": ("prompt", PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="RANDOM", **CAUSAL)),
    "prefix_2": ("prefix", PrefixTuningConfig(num_virtual_tokens=2, **CAUSAL)),
    "loha_v_r2": ("loha", LoHaConfig(r=2, alpha=4, target_modules=["v_proj"], **CAUSAL)),
}
TEMPLATE = {"instruction": "Answer in one short sentence.", "input_prefix": "Q: ", "input_suffix": "\nA:"}
KINDS = (*SMALL, "template")
HOT = 32  # tasks in the "resident" load, and clients
ZIPF_S = 1.1


# --- the adapters ------------------------------------------------------------------------------------


def base_adapters(model, root: Path) -> dict[str, dict[str, bytes]]:
    """One real PEFT save_pretrained output per kind (made once under `root`), as upload files."""
    found = {}
    for kind, (randomise_as, config) in SMALL.items():
        path = root / kind
        if not (path / "adapter_model.safetensors").is_file():
            make_adapter(model, randomise_as, path, seed=len(found), config=config)
        found[kind] = peft_files(path)
    found["template"] = {"template.json": json.dumps(TEMPLATE).encode()}
    return found


class Variants:
    """Task i: the base adapter of kind i % len(KINDS), its tensors scaled by 1 + i/1e6 (distinct, same shapes)."""

    def __init__(self, bases: dict[str, dict[str, bytes]]):
        self.bases = bases
        self.tensors = {k: load_safetensors(f["adapter_model.safetensors"]) for k, f in bases.items() if k in SMALL}

    @staticmethod
    def task_id(i: int) -> str:
        return f"t{i:05d}-{KINDS[i % len(KINDS)]}"

    def files(self, i: int) -> dict[str, bytes]:
        kind = KINDS[i % len(KINDS)]
        if kind == "template":
            return {"template.json": json.dumps({**TEMPLATE, "instruction": f"Answer task {i} briefly."}).encode()}
        scale = 1.0 + i / 1e6
        tensors = {name: t * scale for name, t in self.tensors[kind].items()}
        return {**self.bases[kind], "adapter_model.safetensors": save_safetensors(tensors)}


# --- one server (a child process) ------------------------------------------------------------------


class Server:
    """A store, the task layer, the residency and an engine, as `server/app.py` wires them."""

    def __init__(self, args, store_url: str):
        warnings.filterwarnings("ignore")
        transformers.logging.set_verbosity_error()
        self.backbone = Backbone.load(device=args.device)
        if args.tiny:  # a 4-layer model with the default's tokenizer: steps take milliseconds, overheads show
            tokenizer = self.backbone.tokenizer
            model = tiny_llama(vocab_size=len(tokenizer), hidden_size=128, num_layers=4, intermediate_size=256)
            self.backbone = Backbone(model.to(self.backbone.device), tokenizer, name="tiny")
        self.variants = Variants(base_adapters(self.backbone.model, args.adapters / self.backbone.name))
        self.store = open_store(store_url)
        self.tasks = TaskService(self.store)
        self.residency = Residency(self.backbone, self.store)
        self.tasks.attach(self.residency)
        settings = EngineSettings(max_batch_size=64, max_queue=4096)
        self.engine = Engine(self.backbone, settings, self.residency, resolve=self.tasks.key).start()
        self.prompts = make_prompts(self.backbone.tokenizer, 64, args.prompt_tokens, seed=3)
        self.sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        self.registered = 0
        self.touched: set[int] = set()  # tasks a request has asked for (maybe resident)

    # registration

    def register(self, count: int, every: int, threads: int = 1) -> dict:
        """Upload tasks registered..count from `threads` uploaders; the upload rate over each `every` uploads."""
        rates = []
        pool = ThreadPoolExecutor(threads)
        while self.registered < count:
            batch = range(self.registered, min(count, self.registered + every))
            files = [self.variants.files(i) for i in batch]  # made before the clock starts
            started = time.perf_counter()
            list(pool.map(lambda i, f: self.tasks.upload(self.variants.task_id(i), f), batch, files))
            rates.append((batch.stop, len(batch) / (time.perf_counter() - started)))
            self.registered = batch.stop
        return {"rates": rates}

    def memory(self, extra: int) -> dict:
        """Python memory that `extra` more registrations leave behind, per task (traced), and the process RSS."""
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        for i in range(self.registered, self.registered + extra):  # the files too: whatever is kept of them counts
            self.tasks.upload(self.variants.task_id(i), self.variants.files(i))
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        self.registered += extra
        return {"bytes_per_task": (after - before) / extra, "rss_mb": _rss() / 2**20, "registered": self.registered}

    def listing(self, limit: int) -> dict:
        """Page through every task, as the API's `GET /v1/tasks` does; twice, a second apart (the second pass is
        what a console sees once registration has settled)."""
        passes = []
        for _ in range(2):
            pages, after, started = 0, None, time.perf_counter()
            seen = 0
            while True:
                page = self.tasks.page(after=after, limit=limit)
                pages, seen = pages + 1, seen + len(page.tasks)
                if page.next_after is None:
                    break
                after = page.next_after
            passes.append(1000 * (time.perf_counter() - started) / pages)
            time.sleep(1.1)
        return {"tasks": seen, "pages": pages, "ms_per_page": passes[-1], "ms_per_page_first": passes[0]}

    # load

    def warm(self, ids: list[int]) -> dict:
        for i in ids:
            self.residency.get(self.tasks.current_key(self.variants.task_id(i)))
            self.touched.add(i)
        return {"resident": self.residency.stats.resident}

    def load(self, ids: list[int], seconds: float, clients: int, seed: int) -> dict:
        """`clients` threads, each sending one request at a time to a Zipf(1.1)-chosen task among `ids` (ranked in
        the order given); generated tokens per second over `seconds`, and TTFTs."""
        weights = [1.0 / (rank + 1) ** ZIPF_S for rank in range(len(ids))]
        total = 0.0
        cumulative = []
        for w in weights:
            total += w
            cumulative.append(total)
        stop_at = time.perf_counter() + seconds
        lock = threading.Lock()
        tokens, ttfts, cold = [0], [], [0]

        def client(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            while time.perf_counter() < stop_at:
                i = ids[bisect.bisect_left(cumulative, rng.random() * total)]
                with lock:
                    cold[0] += i not in self.touched
                    self.touched.add(i)
                ttft, n = self.request(i, self.prompts[rng.randrange(len(self.prompts))], stop_at)
                with lock:
                    tokens[0] += n
                    if ttft is not None:
                        ttfts.append(ttft)

        pauses: list[float] = []
        gc.callbacks.append(collecting := _gc_timer(pauses))
        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = min(time.perf_counter(), stop_at) - started
        gc.callbacks.remove(collecting)
        ttfts.sort()
        return {
            "tokens_per_s": tokens[0] / elapsed,
            "requests": len(ttfts),
            "first_touch": cold[0],
            "ttft_p50": ttfts[len(ttfts) // 2] if ttfts else None,
            "resident": self.residency.stats.resident,
            "gc_ms_per_s": 1000 * sum(pauses) / elapsed,
            "gc_max_ms": 1000 * max(pauses, default=0.0),
            "gc_tracked": len(gc.get_objects()),
        }

    def request(self, i: int, prompt: list[int], stop_at: float = float("inf")) -> tuple[float | None, int]:
        """One request as the API makes it (resolve, lease, submit); (time to first token, tokens before stop_at)."""
        task_id = self.variants.task_id(i)
        done, first, counted = threading.Event(), [None], [0]
        started = time.perf_counter()

        def sink(delta) -> None:
            now = time.perf_counter()
            if delta.token_ids and first[0] is None:
                first[0] = now - started
            if now < stop_at:
                counted[0] += len(delta.token_ids)
            if delta.finish_reason is not None:
                done.set()

        lease = self.residency.acquire(self.tasks.current_key(task_id))
        self.engine.submit(GenerationRequest(tuple(prompt), self.sampling, task_id=task_id), sink, lease)
        done.wait()
        return first[0], counted[0]

    def first_tokens(self, cold: list[int], resident: list[int]) -> dict:
        """TTFT of single requests on an idle engine: tasks never asked for vs resident ones, interleaved."""
        out: dict[str, list[float]] = {"cold": [], "resident": []}
        for c, r in zip(cold, resident):
            for name, i in (("cold", c), ("resident", r)):
                out[name].append(self.request(i, self.prompts[i % len(self.prompts)])[0])
                self.touched.add(i)
        return {f"{name}_p50": statistics.median(v) for name, v in out.items()}

    def profile(self, ids: list[int], seconds: float, clients: int, path: str) -> dict:
        """cProfile of the engine's steps under the load, and of 200 uploads, written to `path`.steps / .uploads."""
        import cProfile

        steps, step = cProfile.Profile(), self.engine.step

        def profiled_step() -> None:
            steps.enable()
            try:
                step()
            finally:
                steps.disable()

        loads, load = [], self.residency._load

        def timed_load(entry) -> None:
            started = time.perf_counter()
            load(entry)
            loads.append(time.perf_counter() - started)

        self.engine.step, self.residency._load = profiled_step, timed_load
        try:
            result = self.load(ids, seconds, clients, seed=99)
        finally:
            del self.engine.step, self.residency._load
        steps.dump_stats(f"{path}.steps")
        loads.sort()
        result["load_ms_p50"] = 1000 * loads[len(loads) // 2] if loads else None
        result["load_ms_max"] = 1000 * loads[-1] if loads else None
        files = [self.variants.files(i) for i in range(self.registered, self.registered + 200)]
        uploads = cProfile.Profile()
        uploads.enable()
        for n, f in enumerate(files):
            self.tasks.upload(self.variants.task_id(self.registered + n), f)
        uploads.disable()
        self.registered += len(files)
        uploads.dump_stats(f"{path}.uploads")
        return result


def _gc_timer(pauses: list[float]):
    """A gc callback appending each collection's duration to `pauses`."""
    began = [0.0]

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            pauses.append(time.perf_counter() - began[0])

    return callback


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(args) -> None:
    torch.set_num_threads(args.threads)
    server = Server(args, args.store_url)
    for line in sys.stdin:
        command = json.loads(line)
        name = command.pop("do")
        if name == "quit":
            break
        result = getattr(server, name)(**command)
        print(json.dumps(result), flush=True)
    server.engine.stop()
    server.tasks.close()
    server.store.close()


class Remote:
    """A child server process: one JSON command per line in, one JSON result per line out."""

    def __init__(self, argv: list[str], store_url: str):
        cmd = [sys.executable, __file__, *argv, "--child", "--store-url", store_url]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)

    def __call__(self, do: str, **kwargs) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"do": do, **kwargs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the child server died during {do!r} (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write('{"do": "quit"}\n')  # type: ignore[union-attr]
            self.proc.stdin.flush()  # type: ignore[union-attr]
            self.proc.wait(60)


# --- the run -----------------------------------------------------------------------------------------


def run_store(args, argv: list[str], store: str, workdir: Path) -> dict:
    redis_servers = []

    workdir.mkdir(parents=True, exist_ok=True)

    def url(name: str) -> str:
        if store == "disk":
            return f"file://{workdir / name}"
        server = RedisServer(workdir)
        server.start()
        redis_servers.append(server)
        return server.url

    rng = random.Random(7)
    hot = list(range(HOT))  # the first 32 ids: every kind
    ranked = list(range(args.tasks))
    rng.shuffle(ranked)  # Zipf ranks over all tasks, the hot 32 among them wherever they fall
    big, small = Remote(argv, url("big")), Remote(argv, url("small"))
    try:
        every = max(100, args.tasks // 10)
        rates = big("register", count=args.tasks, every=every, threads=args.upload_threads)["rates"]
        result = {"store": store, "uploads": rates, "upload_threads": args.upload_threads}
        small("register", count=HOT, every=HOT)
        result["memory"] = big("memory", extra=args.memory_sample)
        result["listing"] = big("listing", limit=100)
        for remote in (big, small):
            remote("warm", ids=hot)
            remote("load", ids=hot, seconds=2.0, clients=HOT, seed=0)  # warm-up
        never = [i for i in ranked if i >= HOT][-args.ttft_samples :]  # the Zipf tail: never touched below
        result["ttft"] = big("first_tokens", cold=never, resident=hot[: len(never)])
        rounds = []
        for r in range(args.rounds):
            pair = [("big", big), ("small", small)]
            if r % 2:
                pair.reverse()
            entry = {name: remote("load", ids=hot, seconds=args.seconds, clients=HOT, seed=r) for name, remote in pair}
            ranked_live = [i for i in ranked if i not in set(never)]
            entry["zipf"] = big("load", ids=ranked_live, seconds=args.seconds, clients=HOT, seed=r)
            rounds.append(entry)
            console.log(
                f"{store} round {r}: 32 hot {entry['big']['tokens_per_s']:.0f} tok/s here, "
                f"{entry['small']['tokens_per_s']:.0f} on the 32-task server; "
                f"zipf {entry['zipf']['tokens_per_s']:.0f} ({entry['zipf']['first_touch']} first touches)"
            )
        result["rounds"] = rounds
        if args.warm_all:  # every task resident: what is left of the gap is the batches' diversity, not loads
            big("warm", ids=ranked)
            result["zipf_all_resident"] = [
                {
                    name: remote("load", ids=ids, seconds=args.seconds, clients=HOT, seed=r)
                    for name, remote, ids in (("zipf", big, ranked), ("big", big, hot))
                }
                for r in range(args.rounds)
            ]
        if args.profile:
            result["profile"] = big("profile", ids=ranked, seconds=args.seconds, clients=HOT, path=args.profile)
        return result
    finally:
        big.close()
        small.close()
        for server in redis_servers:
            server.stop()


def report(results: list[dict], args) -> None:
    for r in results:
        table = Table(
            title=f"{args.tasks} tasks, {r['store']} store, {args.upload_threads} uploader(s): "
            "uploads per second by tasks registered"
        )
        table.add_column("registered", justify="right")
        table.add_column("uploads/s", justify="right")
        for count, rate in r["uploads"]:
            table.add_row(str(count), f"{rate:.0f}")
        console.print(table)
    model = "a 4-layer model" if args.tiny else "the default model"
    table = Table(
        title=f"{args.tasks} tasks of {len(KINDS)} kinds on {model}, {HOT} clients, {args.new_tokens} new tokens each"
    )
    for col in (
        "store",
        "uploads/s min",
        "B / cold task",
        "list page",
        "zipf / 32 resident (>=0.8)",
        "32 here / 32-task server (>=0.9)",
        "cold TTFT - resident p50 (<=100ms)",
        "GC ms/s zipf, 32 here",
    ):
        table.add_column(col, justify="right")
    for r in results:
        hot = sum(x["big"]["tokens_per_s"] for x in r["rounds"])
        alone = sum(x["small"]["tokens_per_s"] for x in r["rounds"])
        zipf = sum(x["zipf"]["tokens_per_s"] for x in r["rounds"])
        t = r["ttft"]
        table.add_row(
            r["store"],
            f"{min(rate for _, rate in r['uploads']):.0f}",
            f"{r['memory']['bytes_per_task']:.0f}",
            f"{r['listing']['ms_per_page']:.1f} ms",
            f"{zipf / hot:.2f} ({zipf / len(r['rounds']):.0f} vs {hot / len(r['rounds']):.0f} tok/s)",
            f"{hot / alone:.2f} ({alone / len(r['rounds']):.0f} tok/s alone)",
            f"{1000 * (t['cold_p50'] - t['resident_p50']):.0f} ms ({1000 * t['resident_p50']:.0f} ms resident)",
            f"{_mean(r, 'zipf', 'gc_ms_per_s'):.1f}, {_mean(r, 'big', 'gc_ms_per_s'):.1f}",
        )
    console.print(table)
    for r in results:
        if "zipf_all_resident" in r:
            zipf = sum(x["zipf"]["tokens_per_s"] for x in r["zipf_all_resident"])
            hot = sum(x["big"]["tokens_per_s"] for x in r["zipf_all_resident"])
            console.print(f"{r['store']}: with every task resident, zipf / 32 resident = {zipf / hot:.2f}")


def _mean(result: dict, load: str, field: str) -> float:
    return statistics.mean(x[load][field] for x in result["rounds"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=1000, help="tasks registered on the big server")
    p.add_argument("--stores", default="disk", help="comma-separated: disk, redis")
    p.add_argument("--seconds", type=float, default=8.0, help="length of each load round")
    p.add_argument("--rounds", type=int, default=2, help="rounds alternating the two servers")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--upload-threads", type=int, default=1, help="concurrent uploaders (1: one after another)")
    p.add_argument("--memory-sample", type=int, default=200, help="registrations traced for memory per task")
    p.add_argument("--ttft-samples", type=int, default=15)
    p.add_argument("--tiny", action="store_true", help="a 4-layer model instead of the default (overheads show)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--adapters", type=Path, default=Path(tempfile.gettempdir()) / "taskserve-many-tasks-adapters")
    p.add_argument("--warm-all", action="store_true", help="then load every task and run the Zipf load again")
    p.add_argument("--profile", help="also profile a Zipf round on the big server into this file (cProfile)")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--store-url", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        child(args)
        return
    args.adapters.mkdir(parents=True, exist_ok=True)
    argv = list(argv or sys.argv[1:])
    workdir = Path(tempfile.mkdtemp(prefix="taskserve-many-tasks-"))
    try:
        results = [run_store(args, argv, store, workdir / store) for store in args.stores.split(",")]
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        report(results, args)
    finally:
        console.log(f"removing {workdir}")
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
