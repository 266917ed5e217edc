"""`taskserve train`: the command line around `clients.train` (progress, summary, upload, samples).

torch, transformers and peft are imported only when a training run starts, so the rest of the CLI stays quick.
"""

from __future__ import annotations

import argparse
import logging
import warnings
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from clients.cli import CliError, UsageError, client_for, err, human_bytes, out, print_json, wants_json
from clients.errors import TaskserveError, TransportError
from clients.sdk import Client
from clients.uploads import check_task_id

__all__ = ["METHOD_NAMES", "add_train_arguments", "cmd_train"]

METHOD_NAMES = ("prefix", "prompt", "p-tuning", "lora", "ia3", "prefix+lora")  # the keys of clients.train.METHODS


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", required=True, choices=METHOD_NAMES, help="what to train")
    parser.add_argument("--data", required=True, type=Path, help='JSONL of {"input","output"} or {"messages"}')
    parser.add_argument("--eval", type=Path, help="JSONL to report an eval loss on, before and after training")
    parser.add_argument("--task", required=True, help="the task name to upload as")
    parser.add_argument(
        "--upload", metavar="URL", help="upload to this server (default: --url / TASKSERVE_URL, if it answers)"
    )
    parser.add_argument("--no-upload", action="store_true", help="only save the adapter")
    parser.add_argument("--out", type=Path, help="directory to save the adapter in (default: out/TASK)")
    parser.add_argument("--epochs", type=int, default=1, metavar="N", help="passes over the data (default: 1)")
    parser.add_argument(
        "--steps", type=int, metavar="N", help="optimizer steps, overriding --epochs (one step = one batch)"
    )
    parser.add_argument(
        "--lr",
        type=float,
        help="learning rate (default: prefix 3e-3, prompt 3e-2, p-tuning 3e-3, lora 1e-3, ia3 3e-3)",
    )
    parser.add_argument(
        "--virtual-tokens",
        type=int,
        metavar="N",
        help="prefix/prompt/p-tuning length in tokens (default: 10 / 20 / 20)",
    )
    parser.add_argument("--model", type=Path, help="a local HF model directory (default: the server's default model)")
    parser.add_argument(
        "--batch-size", type=int, default=8, metavar="N", help="examples per optimizer step (default: 8)"
    )
    parser.add_argument(
        "--max-length", type=int, default=512, metavar="TOKENS", help="tokens per example at most (default: 512)"
    )
    parser.add_argument("--init-text", help="prompt tuning's initial text (default: the outputs' most frequent words)")
    parser.add_argument("--rank", type=int, default=8, metavar="R", help="LoRA rank r (default: 8)")
    parser.add_argument("--lora-alpha", type=float, help="LoRA alpha; the update is scaled by alpha / r (default: 2r)")
    parser.add_argument("--lora-dropout", type=float, default=0.05, help="LoRA dropout probability (default: 0.05)")
    parser.add_argument(
        "--lora-targets",
        default="q_proj,v_proj",
        help="comma-separated module names LoRA adapts (default: q_proj,v_proj)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seeds initialisation, shuffling and dropout: the same seed on the same machine gives the same adapter "
        "(default: 0)",
    )
    parser.add_argument(
        "--device", default="auto", help="auto (CUDA when there is one), cpu, cuda, ... (default: auto)"
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=3,
        metavar="N",
        help="eval records to show outputs for after training (default: 3)",
    )


def cmd_train(args: argparse.Namespace) -> int:
    _check_args(args)
    if args.upload:  # an explicit server must answer before minutes of training, not after
        with client_for(args, url=args.upload, timeout=5.0) as probe:
            probe.health()
    from clients.train_data import DataError, read_records

    try:  # the data and the model directory are checked before the slow imports
        sample_records = read_records(args.data)[: max(0, args.samples)]
        if args.eval is not None:
            sample_records = read_records(args.eval)[: max(0, args.samples)]
        if args.model is not None and not (args.model / "config.json").is_file():
            raise FileNotFoundError(f"{args.model} is not a model directory (no config.json)")
        _quiet_libraries()
        from clients import train as trainer  # torch, transformers, peft: here only

        trained = _run(args, trainer)
    except (DataError, FileNotFoundError) as exc:
        raise CliError(str(exc)) from None
    except ValueError as exc:  # an option the method or the model refuses
        raise UsageError(str(exc)) from None
    summary: dict[str, Any] = {
        "task": args.task,
        "method": trained.method,
        "kind": trained.upload.kind,
        "parameters": trained.upload.parameters,
        "bytes": trained.upload.bytes,
        "out": str(trained.out),
        "examples": trained.examples,
        "skipped": trained.skipped,
        "steps": trained.steps,
        "seconds": round(trained.seconds, 1),
        "train_loss": trained.train_loss,
        "eval_loss_before": trained.eval_loss_before,
        "eval_loss_after": trained.eval_loss_after,
        "version": None,
        "samples": [],
    }
    if not wants_json(args):
        _print_summary(summary)
    client = _upload_client(args)
    if client is not None:
        with client:
            try:
                created = client.upload(args.task, trained.out)
            except TaskserveError as exc:
                raise CliError(f"{exc} (the adapter is saved in {trained.out})") from None
            summary["version"] = created.version
            if not wants_json(args):
                out.print(f"uploaded [bold]{escape(args.task)}[/] version {created.version} to {client.url}")
            summary["samples"] = _server_samples(client, args.task, sample_records, trainer, trained)
    else:
        summary["samples"] = _local_samples(sample_records, trainer, trained)
    if wants_json(args):
        print_json(summary)
    else:
        _print_samples(summary["samples"], served=client is not None)
    return 0


def _check_args(args: argparse.Namespace) -> None:
    try:
        check_task_id(args.task)
    except TaskserveError as exc:
        raise UsageError(str(exc)) from None
    for name in ("epochs", "steps", "batch_size", "max_length", "virtual_tokens", "rank"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1")
    if args.lr is not None and not args.lr > 0:
        raise UsageError("--lr must be positive")
    if args.lora_alpha is not None and not args.lora_alpha > 0:
        raise UsageError("--lora-alpha must be positive")
    if not 0 <= args.lora_dropout < 1:
        raise UsageError("--lora-dropout must be in [0, 1)")
    if not any(t.strip() for t in args.lora_targets.split(",")):
        raise UsageError("--lora-targets names no module")
    if args.upload and args.no_upload:
        raise UsageError("--upload and --no-upload contradict each other")


def _quiet_libraries() -> None:
    """The trainer reports its own progress: silence the libraries' bars and advice."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    logging.getLogger("peft").setLevel(logging.ERROR)
    for category in (UserWarning, FutureWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(peft|transformers|torch)\b")


def _run(args: argparse.Namespace, trainer):
    options = trainer.TrainOptions(
        method=args.method,
        data=args.data,
        eval=args.eval,
        out=args.out or Path("out") / args.task,
        model=args.model,
        epochs=args.epochs,
        steps=args.steps,
        lr=args.lr,
        virtual_tokens=args.virtual_tokens,
        batch_size=args.batch_size,
        max_length=args.max_length,
        init_text=args.init_text,
        lora_rank=args.rank,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        lora_targets=tuple(t.strip() for t in args.lora_targets.split(",") if t.strip()),
        seed=args.seed,
        device=args.device,
    )
    if wants_json(args) or not err.is_terminal:
        return trainer.train(options, on_step=_line_reporter(), on_phase=lambda text: err.print(text))
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=err) as progress:
        bar = progress.add_task("starting", total=None, loss="-")

        def on_step(step: int, total: int, loss: float) -> None:
            progress.update(bar, completed=step, total=total, loss=f"{loss:.3f}")

        def on_phase(text: str) -> None:  # the whole line above the bar, its first words on it
            progress.console.print(escape(text))
            progress.update(bar, description=escape(text.split(":")[0]))

        return trainer.train(options, on_step=on_step, on_phase=on_phase)


def _line_reporter():
    """Off a terminal: one line per tenth of the run, for logs."""

    def on_step(step: int, total: int, loss: float) -> None:
        if step == 1 or step == total or step % max(1, total // 10) == 0:
            err.print(f"step {step}/{total} loss {loss:.3f}")

    return on_step


def _upload_client(args: argparse.Namespace) -> Client | None:
    """Where to upload: --upload URL (must work), else the configured server when it answers, else nowhere."""
    if args.no_upload:
        return None
    if args.upload:
        return client_for(args, url=args.upload)
    client = client_for(args)
    try:
        with client_for(args, timeout=3.0) as probe:
            probe.health()
    except TransportError:
        saved = args.out or Path("out") / args.task
        err.print(f"no server at {client.url}: upload the adapter later with `taskserve upload {args.task} {saved}`")
        client.close()
        return None
    return client


def _server_samples(client: Client, task: str, records, trainer, trained) -> list[dict[str, str]]:
    """Greedy answers to a few records from the server: the backbone alone and the new task."""
    length = trainer.sample_length(records, trained.tokenizer) if records else 32
    samples = []
    for record in records:
        prompt = record.prompt()
        base = client.generate("base", **prompt, max_new_tokens=length).text.strip()
        tuned = client.generate(task, **prompt, max_new_tokens=length).text.strip()
        samples.append({"input": _input_text(record), "expected": record.targets[0], "base": base, "tuned": tuned})
    return samples


def _local_samples(records, trainer, trained) -> list[dict[str, str]]:
    """Greedy answers from the trained model in this process (cache-free: docs/adapters.md, "Traps")."""
    if not records:
        return []
    length = trainer.sample_length(records, trained.tokenizer)
    return [
        {
            "input": _input_text(record),
            "expected": record.targets[0],
            "tuned": trainer.greedy_continuation(
                trained.model, trained.tokenizer, record, max_new_tokens=length
            ).strip(),
        }
        for record in records
    ]


def _input_text(record) -> str:
    prompt = record.prompt()
    return prompt.get("prompt") or prompt["messages"][-1]["content"]


def _print_summary(s: dict[str, Any]) -> None:
    table = Table(show_header=False, box=None)
    table.add_row("adapter", f"{s['kind']}: {s['parameters']:,} parameters, {human_bytes(s['bytes'])}, in {s['out']}")
    skipped = f" ({s['skipped']} skipped: nothing left after --max-length)" if s["skipped"] else ""
    table.add_row("trained", f"{s['steps']} steps on {s['examples']} examples{skipped} in {s['seconds']:.0f} s")
    table.add_row("train loss", f"{s['train_loss']:.3f} (mean of the last steps)")
    if s["eval_loss_after"] is not None:
        table.add_row("eval loss", f"{s['eval_loss_before']:.3f} before, {s['eval_loss_after']:.3f} after")
    out.print(table)


def _print_samples(samples: list[dict[str, str]], *, served: bool) -> None:
    if not samples:
        return
    table = Table(show_lines=True)
    for name in ("input", "expected", *(["base"] if served else []), "tuned"):
        table.add_column(name, overflow="fold")
    for s in samples:
        table.add_row(*(escape(s[k]) for k in ("input", "expected", *(["base"] if served else []), "tuned")))
    out.print(table)
