"""`taskserve`: serve, upload, list, generate, chat, delete, roll back and train tasks from a shell.

Results go to stdout (text, tables, or `--json` for scripts); progress and errors go to stderr. Every failure is one
line, `error: <message>`, with exit status 2 for a bad command line and 1 for anything else.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from clients._protocol import DEFAULT_TIMEOUT
from clients.errors import TaskserveError, TransportError
from clients.models import Task, Version
from clients.sdk import DEFAULT_URL, Client

__all__ = ["main", "build_parser"]

# piped output is not cut to 80 columns: a script reading a table gets one line per row
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 200)
err = Console(stderr=True, highlight=False)


class UsageError(Exception):
    """A bad command line found after parsing (exit status 2)."""


class CliError(Exception):
    """A failure outside the SDK (a file, the training data): exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        _fail(f"{message} (see `{self.prog} --help`)")
        sys.exit(2)


# --- parser ----------------------------------------------------------------------------------------------------


def _common() -> argparse.ArgumentParser:
    """Options accepted before or after the command (`taskserve --json tasks` and `taskserve tasks --json`)."""
    common = _Parser(add_help=False)
    common.add_argument(
        "--url", default=argparse.SUPPRESS, help=f"server URL (env TASKSERVE_URL; default: {DEFAULT_URL})"
    )
    common.add_argument("--api-key", default=argparse.SUPPRESS, help="API key (env TASKSERVE_API_KEY; default: none)")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    common.add_argument(
        "--timeout",
        type=float,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help=f"seconds per request (default: {DEFAULT_TIMEOUT:g})",
    )
    return common


def _sampling(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-new-tokens", type=int, metavar="N", help="tokens to generate at most (default: the server's, 128)"
    )
    parser.add_argument("--temperature", type=float, help="0 = greedy; higher samples more freely (default: 0)")
    parser.add_argument(
        "--top-p", type=float, help="sample only from the most likely tokens whose probabilities sum to P (default: 1)"
    )
    parser.add_argument("--top-k", type=int, help="sample only from the K most likely tokens; 0 = all (default: 0)")
    parser.add_argument(
        "--seed", type=int, help="the same seed, prompt and task give the same sampled text (default: random)"
    )
    parser.add_argument("--stop", action="append", help="stop before this text (repeatable)")
    parser.add_argument(
        "--task-version", dest="version", type=int, metavar="N", help="run this stored version (default: current)"
    )


def build_parser() -> argparse.ArgumentParser:
    common = _common()
    description = "Serve, upload, list, generate, chat, delete, roll back and train tasks."
    parser = _Parser(prog="taskserve", description=description, parents=[common])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, func: Callable[[argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, parents=[common])
        sub.set_defaults(func=func)
        return sub

    serve = commands.add_parser("serve", help="run the server (`python -m server`; flags pass through)", add_help=False)
    serve.add_argument("flags", nargs=argparse.REMAINDER, help="e.g. --port 8000 --store memory://")

    upload = command("upload", cmd_upload, "upload a PEFT directory, a .tar.gz/.zip of one, or a template .json")
    upload.add_argument("task")
    upload.add_argument("path")
    upload.add_argument("--description")

    tasks = command("tasks", cmd_tasks, "list tasks, or show one task's versions")
    tasks.add_argument("task", nargs="?")

    generate = command("generate", cmd_generate, "generate with a task (`base` is the backbone alone)")
    generate.add_argument("task")
    generate.add_argument("prompt", help="the prompt; - reads it from stdin")
    generate.add_argument("--stream", action="store_true", help="print tokens as they come")
    generate.add_argument("--chat", action="store_true", help="send the prompt as a user message (chat template)")
    generate.add_argument("--system", help="a system message (implies --chat)")
    _sampling(generate)

    chat = command("chat", cmd_chat, "chat with a task interactively (Ctrl-D quits, /reset forgets)")
    chat.add_argument("task")
    chat.add_argument("--system", help="a system message")
    _sampling(chat)

    rm = command("rm", cmd_rm, "delete a task and all its versions (asks first unless --yes)")
    rm.add_argument("task")
    rm.add_argument("-y", "--yes", action="store_true", help="delete without asking")

    rollback = command("rollback", cmd_rollback, "make an earlier version of a task current again")
    rollback.add_argument("task")
    rollback.add_argument("version", type=int)

    command("status", cmd_status, "is the server up and ready?")

    keys = command("keys", cmd_keys, "tenants' API keys: create, list, revoke (needs a bootstrap admin key)")
    actions = keys.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="a new key for a tenant; printed once", parents=[common])
    create.add_argument("tenant", help="the tenant: its namespace, e.g. team-a (tasks team-a/...)")
    create.add_argument("--admin", action="store_true", help="may also upload, roll back and delete its tasks")
    create.add_argument("--requests-per-s", type=float, metavar="N", help="quota: requests per second")
    create.add_argument("--tokens-per-min", type=int, metavar="N", help="quota: prompt + completion tokens per minute")
    listing = actions.add_parser("list", help="every key (ids, never the keys)", parents=[common])
    listing.add_argument("--tenant", help="only this tenant's keys")
    revoke = actions.add_parser("revoke", help="revoke a key by its id", parents=[common])
    revoke.add_argument("id")

    from clients.cli_train import add_train_arguments, cmd_train  # no torch import here: only at run time

    add_train_arguments(command("train", cmd_train, "train a PEFT adapter on the server's backbone and upload it"))
    return parser


# --- entry point -------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    serve_at = _command_index(argv)
    if serve_at is not None and argv[serve_at] == "serve":
        return _serve(argv[serve_at + 1 :])
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as exc:
        _fail(f"{exc} (see `taskserve {args.command} --help`)")
        return 2
    except (TaskserveError, CliError) as exc:
        _fail(str(exc))
        return 1
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130


def _command_index(argv: list[str]) -> int | None:
    """Where the command word is, skipping global options (and their values)."""
    takes_value = {"--url", "--api-key", "--timeout"}
    i = 0
    while i < len(argv):
        word = argv[i]
        if not word.startswith("-"):
            return i
        i += 2 if word in takes_value else 1
    return None


def _serve(flags: list[str]) -> int:
    """Replace this process with `python -m server FLAGS` (so signals and the exit status are the server's)."""
    command = [sys.executable, "-m", "server", *flags]
    try:
        os.execv(sys.executable, command)
    except OSError as exc:
        _fail(f"cannot start the server: {exc}")
        return 1
    return 0  # pragma: no cover - execv does not return


def _fail(message: str) -> None:
    sys.stderr.write("error: " + " ".join(str(message).split()) + "\n")


def client_for(args: argparse.Namespace, url: str | None = None, timeout: float | None = None) -> Client:
    return Client(
        url=url or getattr(args, "url", None),
        api_key=getattr(args, "api_key", None),
        timeout=timeout or getattr(args, "timeout", None) or DEFAULT_TIMEOUT,
    )


def wants_json(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "json", False))


def print_json(value: Any) -> None:
    if hasattr(value, "model_dump"):
        value = value.model_dump(mode="json")
    sys.stdout.write(json.dumps(value, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@contextmanager
def spinner(args: argparse.Namespace, text: str):
    """A spinner on stderr while a request runs (nothing with --json or off a terminal)."""
    if wants_json(args) or not err.is_terminal:
        yield
        return
    with err.status(text):
        yield


# --- commands ----------------------------------------------------------------------------------------------------


def cmd_upload(args: argparse.Namespace) -> int:
    with client_for(args) as client, spinner(args, f"uploading {args.path} as {args.task}"):
        created = client.upload(args.task, args.path, description=args.description)
    if wants_json(args):
        print_json(created)
    elif created.unchanged:
        out.print(f"unchanged: [bold]{escape(created.task_id)}[/] version {created.version} already holds these files")
    else:
        out.print(f"uploaded [bold]{escape(created.task_id)}[/] version {created.version}: {_describe(created)}")
    return 0


def cmd_tasks(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        if args.task is not None:
            return _show_task(args, client.task(args.task))
        versions = list(client.tasks())
    if wants_json(args):
        print_json([v.model_dump(mode="json") for v in versions])
        return 0
    if not versions:
        out.print("no tasks yet: `taskserve upload TASK DIR` or `taskserve train ...` adds one")
        return 0
    table = _table("task", "version", "kind", "parameters", "size", "created", "description")
    for v in versions:
        table.add_row(
            escape(v.task_id),
            str(v.version),
            v.kind,
            f"{v.parameters:,}",
            human_bytes(v.bytes),
            _when(v.created_at),
            escape(v.description or ""),
        )
    out.print(table)
    return 0


def _show_task(args: argparse.Namespace, task: Task) -> int:
    if wants_json(args):
        print_json(task)
        return 0
    where = "on the device" if task.resident else "not on the device"
    out.print(f"[bold]{escape(task.task_id)}[/] version {task.version} ({task.kind}), {where}")
    table = _table("", "version", "kind", "parameters", "size", "created", "sha256", "description")
    for v in task.versions:
        table.add_row(
            "*" if v.version == task.version else "",
            str(v.version),
            v.kind,
            f"{v.parameters:,}",
            human_bytes(v.bytes),
            _when(v.created_at),
            v.sha256[:12],
            escape(v.description or ""),
        )
    out.print(table)
    return 0


def _sampling_of(args: argparse.Namespace) -> dict[str, Any]:
    names = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "version")
    return {name: getattr(args, name) for name in names if getattr(args, name) is not None}


def cmd_generate(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    inputs: dict[str, Any] = {"prompt": prompt}
    if args.chat or args.system is not None:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        inputs = {"messages": [*system, {"role": "user", "content": prompt}]}
    with client_for(args) as client:
        if not args.stream:
            with spinner(args, f"generating with {args.task}"):
                result = client.generate(args.task, **inputs, **_sampling_of(args))
            if wants_json(args):
                print_json(result)
            else:
                sys.stdout.write(result.text.strip() + "\n")
            return 0
        _print_stream(args, client.stream(args.task, **inputs, **_sampling_of(args)))
    return 0


def _print_stream(args: argparse.Namespace, events) -> str:
    """Print a stream (text as it comes, or one JSON object per event); the whole text."""
    text = ""
    for event in events:
        if wants_json(args):
            print_json(event)
        elif event.text:
            piece = event.text if text.strip() else event.text.lstrip()  # no leading blank lines
            sys.stdout.write(piece)
            sys.stdout.flush()
        text += event.text
    if not wants_json(args):
        sys.stdout.write("\n")
    return text


def cmd_chat(args: argparse.Namespace) -> int:
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - not on every platform
        pass
    start = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    with client_for(args) as client:
        # an unknown task or an unreachable server fails here, before any typing
        kind = client.task(args.task).kind if args.task != "base" else "base" if client.health() else ""
        err.print(f"chatting with [bold]{escape(args.task)}[/]; Ctrl-D quits, /reset forgets the conversation")
        if kind == "template":  # a template wraps one input: no history to keep
            err.print("a template task: each line is answered on its own")
        while True:
            try:
                line = input("> ")
            except EOFError:
                err.print()
                return 0
            except KeyboardInterrupt:
                err.print()
                continue
            if not line.strip():
                continue
            if line.strip() == "/reset":
                history = list(start)
                continue
            turn = [*history, {"role": "user", "content": line}]
            try:
                reply = _print_stream(args, client.stream(args.task, messages=turn, **_sampling_of(args)))
            except KeyboardInterrupt:  # stop this answer, keep the conversation as it was
                sys.stdout.write("\n")
                continue
            except TransportError:
                raise
            except TaskserveError as exc:  # one bad turn does not end the conversation
                _fail(str(exc))
                continue
            if kind != "template":
                history = [*turn, {"role": "assistant", "content": reply.strip()}]


def cmd_rm(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        if not args.yes:
            versions = len(client.task(args.task).versions)  # an unknown task fails here, before any question
            _confirm(f"delete task {args.task!r} and all its {versions} version(s)? [y/N] ")
        client.delete(args.task)
    if wants_json(args):
        print_json({"task_id": args.task, "deleted": True})
    else:
        out.print(f"deleted [bold]{escape(args.task)}[/]")
    return 0


def _confirm(question: str) -> None:
    """Ask on the terminal; off a terminal nobody can answer, so --yes is required."""
    if not sys.stdin.isatty():
        raise UsageError("not deleting without confirmation: pass --yes (stdin is not a terminal to ask on)")
    err.print(question, end="")
    try:
        answer = input()
    except EOFError:
        answer = ""
    if answer.strip().lower() not in ("y", "yes"):
        raise CliError("not deleted")


def cmd_rollback(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        current = client.rollback(args.task, args.version)
    if wants_json(args):
        print_json(current)
    else:
        out.print(f"[bold]{escape(current.task_id)}[/] is at version {current.version} again: {_describe(current)}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        if args.action == "create":
            scope = "admin" if args.admin else "inference"
            quota = {"requests_per_s": args.requests_per_s, "tokens_per_min": args.tokens_per_min}
            created = client.create_key(args.tenant, scope=scope, **quota)
            if wants_json(args):
                print_json(created)
            else:
                err.print(f"key {created.id} for tenant {escape(created.tenant)} ({scope}); it is shown only now:")
                out.print(created.key, markup=False, highlight=False)
        elif args.action == "list":
            found = client.keys(args.tenant)
            if wants_json(args):
                print_json([k.model_dump(mode="json") for k in found])
                return 0
            table = _table("id", "tenant", "scope", "requests/s", "tokens/min", "created", "description")
            for k in found:
                limits = (k.requests_per_s, k.tokens_per_min)
                table.add_row(
                    k.id,
                    escape(k.tenant),
                    k.scope,
                    *(f"{v:g}" if v else "-" for v in limits),
                    _when(k.created_at),
                    escape(k.description or ""),
                )
            out.print(table)
        else:
            client.revoke_key(args.id)
            if wants_json(args):
                print_json({"id": args.id, "revoked": True})
            else:
                out.print(f"revoked key {escape(args.id)}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with client_for(args) as client:
        readiness = client.ready()
    if wants_json(args):
        print_json({"url": client.url, **readiness.model_dump(mode="json")})
    elif readiness.ready:
        out.print(f"{client.url}: ready, model {readiness.model}")
    else:
        out.print(
            f"{client.url}: up, not ready ({readiness.status}{': ' + readiness.detail if readiness.detail else ''})"
        )
    return 0 if readiness.ready else 1


# --- formatting --------------------------------------------------------------------------------------------------


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"  # pragma: no cover


def _table(*columns: str) -> Table:
    """A borderless table whose columns keep their values on one line, except the last (free text), which wraps."""
    table = Table(box=None, pad_edge=False)
    for i, name in enumerate(columns):
        last = i == len(columns) - 1
        table.add_column(name, no_wrap=not last, overflow="fold", justify="right" if name == "parameters" else "left")
    return table


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(timestamp))


def _describe(v: Version) -> str:
    if v.kind == "template":
        return "template" + (f", {escape(v.description)}" if v.description else "")
    return f"{v.kind}, {v.parameters:,} parameters, {human_bytes(v.bytes)}"


if __name__ == "__main__":
    # `python -m clients.cli`: run the importable module's main, so that `clients.cli_train` and this share one module
    from clients.cli import main as _main

    sys.exit(_main())
