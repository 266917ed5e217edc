"""What LoRA rows cost in memory: many rows over a few adapters must add the adapters once, not once per row.

On the default model: `--rows` requests (short prompts, `--new-tokens` each, all submitted at once) spread over
`--adapters` distinct all-linear r=16 LoRAs, against the same requests on the base model. Each measurement runs
in a fresh process and reports the peak memory of the serving part (RSS on CPU, allocated CUDA memory on a GPU,
measured from before the adapters are registered, peak while serving) and the throughput.

    python bench/lora_memory.py [--compare-with ../old-checkout]

Target: LoRA peak - base peak <= the adapters' own bytes + small per-step buffers; throughput at least the other
checkout's on the same load.
"""

# ruff: noqa: E402

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse
import ctypes
import gc
import json
import resource
import tempfile
import threading
import time
import warnings

import torch
import transformers
from rich.console import Console
from rich.table import Table
from workload import Engine, make_prompts, make_tasks, run_elsewhere, serve, without  # first: --compare-with

from adapters_store import open_store
from server.config import EngineSettings
from server.engine.backbone import Backbone
from server.engine.request import GenerationRequest
from server.engine.residency import Residency
from server.engine.sampling import SamplingParams

console = Console(width=None if sys.stdout.isatty() else 160)
MiB = 1 << 20


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def release_freed_memory() -> None:
    """Hand memory freed by Python and torch back to the OS, so RSS shows what is really held."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


class PeakRSS:
    """Samples the resident set every millisecond from now on: the peak, above a `base` taken earlier."""

    def __init__(self, base: int) -> None:
        self.base, self.peak = base, current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.wait(0.001):
            self.peak = max(self.peak, current_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, current_rss()) - self.base


def measure(args) -> dict:
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    backbone = Backbone.load(device=args.device)
    cuda = backbone.device.type == "cuda"
    maker = backbone.model if not cuda else Backbone.load(device="cpu").model
    root = args.adapters_dir or Path(tempfile.mkdtemp(prefix="taskserve-loramem-"))
    tasks = make_tasks(maker, root, args.adapters, kinds=("lora_all_r16",), prefix="mem")
    adapter_bytes = sum((t.path / "adapter_model.safetensors").stat().st_size for t in tasks)
    # files on disk and no host tier: on a CPU either would be another copy of each adapter in the same RAM
    store = open_store(f"file://{tempfile.mkdtemp(prefix='taskserve-loramem-store-')}")
    residency = Residency(backbone, store, host_bytes=0)
    engine = Engine(backbone, EngineSettings(max_batch_size=args.rows), residency)
    prompts = make_prompts(backbone.tokenizer, args.rows, 12)
    release_freed_memory()
    if cuda:
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
    before_rss = current_rss()
    if args.variant == "lora":  # the base run registers nothing: the difference is everything LoRA costs
        for task in tasks:
            serve(residency, task.task_id, task.path)
    ids = [tasks[i % len(tasks)].task_id for i in range(args.rows)] if args.variant == "lora" else ["base"] * args.rows

    def run(new_tokens: int) -> float:
        sampling = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
        for p, t in zip(prompts, ids):
            engine.submit(GenerationRequest(tuple(p), sampling, task_id=t), sink=lambda d: None)
        started = time.perf_counter()
        engine.run_until_idle()
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - started

    release_freed_memory()  # what parsing the uploads left behind is not what serving holds
    loaded = (torch.cuda.memory_allocated() - before) if cuda else current_rss() - before_rss
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    watch = PeakRSS(before_rss)
    seconds = run(args.new_tokens)
    peak = (torch.cuda.max_memory_allocated() - before) if cuda else watch.stop()
    return {
        "variant": args.variant,
        "peak_bytes": peak,
        "loaded_bytes": loaded,
        "tokens_per_s": args.rows * args.new_tokens / seconds,
        "adapter_bytes": adapter_bytes,
        "memory": "CUDA allocated" if cuda else "RSS",
    }


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--adapters", type=int, default=4, help="distinct all-linear r=16 LoRAs the rows spread over")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--adapters-dir", type=Path, help="keep the generated PEFT adapters here and reuse them")
    p.add_argument("--compare-with", type=Path, help="another checkout to measure too, on the same load")
    p.add_argument("--variant", choices=["base", "lora"], default="lora", help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.child:
        print(json.dumps(measure(args)))
        return
    child = without(without(list(argv or sys.argv[1:]), "--compare-with"), "--variant")
    trees = {"this checkout": None} | ({str(args.compare_with): args.compare_with} if args.compare_with else {})
    table = Table(
        title=f"{args.rows} rows, {args.new_tokens} new tokens each, over {args.adapters} all-linear r=16 LoRAs"
    )
    columns = ("engine", "base peak", "LoRA loaded", "LoRA peak", "LoRA - base", "adapters' bytes", "tok/s base")
    for col in (*columns, "tok/s LoRA"):
        table.add_column(col, justify="right")
    for name, tree in trees.items():
        base = run_elsewhere(__file__, [*child, "--variant", "base"], tree)
        lora = run_elsewhere(__file__, [*child, "--variant", "lora"], tree)
        table.add_row(
            name,
            f"{base['peak_bytes'] / MiB:.0f} MiB",
            f"{lora['loaded_bytes'] / MiB:.0f} MiB",
            f"{lora['peak_bytes'] / MiB:.0f} MiB",
            f"{(lora['peak_bytes'] - base['peak_bytes']) / MiB:.0f} MiB",
            f"{lora['adapter_bytes'] / MiB:.0f} MiB",
            f"{base['tokens_per_s']:.1f}",
            f"{lora['tokens_per_s']:.1f}",
        )
    console.print(table)
    console.print(f"memory: {lora['memory']}, peak while serving, above what was held before any adapter was loaded")


if __name__ == "__main__":
    main()
