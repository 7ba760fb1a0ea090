"""`g amqp-tasks`: tasks, workers, queues and dead letters from the command line (docs/operations.md).

Aligned text tables for people, `--json` for scripts. An unknown id or a refused
operation exits 1 with a one-line reason on stderr. Put `-c config.yaml` before the action.
"""

import argparse
import copy
import json
import logging
import sys
import time
from typing import Any

from guillotina.commands import Command

from guillotina_amqp import names, queues, task_index
from guillotina_amqp.exceptions import TaskNotFoundException
from guillotina_amqp.retry import RetryRefused, retry_task
from guillotina_amqp.settings import get_settings
from guillotina_amqp.state import TaskState, get_state_manager
from guillotina_amqp.terminal import terminal_safe

TASK_COLUMNS = ("task_id", "status", "function", "age", "duration", "retries", "progress")
#: states read per round trip when listing without --container (a scan of every state)
SCAN_BATCH = 500


class Failure(Exception):
    """Ends the command with exit code 1 and this one-line reason."""


class TasksCommand(Command):
    description = "Inspect and operate guillotina_amqp tasks, workers, queues and dead letters"
    exit_code = 0

    def get_parser(self) -> argparse.ArgumentParser:
        parser = super().get_parser()
        parser.add_argument("command", help=argparse.SUPPRESS)  # "amqp-tasks" itself
        parser.add_argument("--json", action="store_true", help="JSON output for scripts")
        common = argparse.ArgumentParser(add_help=False)
        common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="JSON output")
        actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
        listing = actions.add_parser("list", parents=[common], help="tasks, newest first")
        listing.add_argument("--status", choices=names.INDEXED_STATUSES)
        listing.add_argument(
            "--container", metavar="DB/CONTAINER", help="one container's tasks (from its index; else a scan)"
        )
        listing.add_argument("--function", help="only tasks whose function contains this text")
        listing.add_argument("--limit", type=int, default=task_index.DEFAULT_LIMIT)
        for action, text in (("show", "a task's state"), ("cancel", "cancel a task"), ("retry", "re-run")):
            actions.add_parser(action, parents=[common], help=text).add_argument("task_id")
        named = argparse.ArgumentParser(add_help=False)
        named.add_argument(
            "--queue", type=_queue_name, help="a named queue's error queues (default: amqp.queue's)"
        )
        letters = actions.add_parser("dead-letters", help="the error queue")
        letter_actions = letters.add_subparsers(dest="letters_action", required=True, metavar="ACTION")
        letter_actions.add_parser("list", parents=[common, named], help="messages in the error queue")
        requeue = letter_actions.add_parser(
            "requeue", parents=[common, named], help="back into the queue they died in"
        )
        which = requeue.add_mutually_exclusive_group(required=True)
        which.add_argument("--all", action="store_true", help="every dead letter")
        which.add_argument("task_id", nargs="?", help="the dead letter of this task")
        letter_actions.add_parser("purge", parents=[common, named], help="drop every dead letter")
        actions.add_parser("workers", parents=[common], help="live workers and their load")
        depths = actions.add_parser("queues", parents=[common], help="messages waiting per queue")
        depths.add_argument(
            "--queue", type=_queue_name, action="append", default=[], help="a named queue too (repeatable)"
        )
        return parser

    def run_command(self, settings: Any = None, loop: Any = None) -> None:
        super().run_command(settings=settings, loop=loop)
        sys.exit(self.exit_code)

    def make_app(self, settings: dict) -> Any:
        # the output is what was asked for: guillotina's start-up INFO lines (the shipped
        # config.yaml logs INFO) would mix with a table or with JSON a script parses
        if not self.arguments.debug and isinstance(settings.get("logging"), dict):
            settings = {**settings, "logging": quiet_logging(settings["logging"])}
        return super().make_app(settings)

    async def cleanup(self, app: Any) -> None:
        """Shut the application down, without guillotina's wait for every task still pending.

        guillotina's cleanup waits a second for each unfinished task, the command's own
        (which is the one running this cleanup) included: every command ended a second late
        with "Timeout for Command._run_async". What is left is cancelled when the loop closes.
        """
        try:
            await app.shutdown()
        except Exception:
            logging.getLogger("guillotina_amqp").warning("amqp-tasks: shutting down failed", exc_info=True)

    async def run(self, arguments: argparse.Namespace, settings: dict, app: Any) -> None:
        action = arguments.action
        if action == "dead-letters":
            action = f"letters_{arguments.letters_action}"
        try:
            await getattr(self, f"do_{action}".replace("-", "_"))(arguments)
        except (Failure, RetryRefused) as exc:
            _print(f"amqp-tasks: {exc}", file=sys.stderr)
            self.exit_code = 1

    # -- tasks ------------------------------------------------------------------
    async def do_list(self, arguments: argparse.Namespace) -> None:
        manager = get_state_manager()
        if arguments.container:
            db, _, container = arguments.container.partition("/")
            if not db or not container:
                raise Failure(f"--container {arguments.container!r}: give it as DB/CONTAINER")
            prefix = names.task_id_prefix(db, container)
            query = (arguments.limit, None, arguments.status, None, arguments.function)
            found = (await task_index.page(manager, prefix, *query)).tasks
        else:
            found = await _scan(arguments.status, arguments.function, arguments.limit)
        _output(arguments, found, TASK_COLUMNS)

    async def do_show(self, arguments: argparse.Namespace) -> None:
        state = await _existing(arguments.task_id)
        if arguments.json:
            _print(json.dumps(state, indent=2, default=str))
            return
        width = max(len(terminal_safe(key)) for key in state)
        for key, value in sorted(state.items()):
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            # a traceback keeps its lines, indented under the value: no line of a value can
            # pass for a field of its own
            lines = [terminal_safe(line) for line in text.split("\n")]
            print(f"{terminal_safe(key).ljust(width)}  " + ("\n" + " " * (width + 2)).join(lines))

    async def do_cancel(self, arguments: argparse.Namespace) -> None:
        state = await _existing(arguments.task_id)
        await TaskState(arguments.task_id).cancel()
        _say(arguments, {"task_id": arguments.task_id, "canceled": True, "status": state.get("status")})

    async def do_retry(self, arguments: argparse.Namespace) -> None:
        await _existing(arguments.task_id)
        await retry_task(arguments.task_id)
        _say(arguments, {"task_id": arguments.task_id, "status": "scheduled"})

    # -- workers and queues -----------------------------------------------------------
    async def do_workers(self, arguments: argparse.Namespace) -> None:
        found = await get_state_manager().workers()
        rows = [
            {
                **worker,
                "running": f"{len(worker.get('running') or [])}/{worker.get('max_running')}",
                "seen": _seconds(time.time() - worker.get("seen", time.time())) + " ago",
            }
            for worker in found
        ]
        columns = ("worker_id", "host", "pid", "queue", "running", "total_run", "total_errored", "seen")
        _output(arguments, found if arguments.json else rows, columns)

    async def do_queues(self, arguments: argparse.Namespace) -> None:
        found = await queues.depths(get_settings(), arguments.queue)
        _output(arguments, found, ("queue", "messages", "consumers"))

    # -- the error queue ----------------------------------------------------------
    async def do_letters_list(self, arguments: argparse.Namespace) -> None:
        letters = await queues.dead_letters(get_settings(), queue=arguments.queue)
        found = [letter.describe() for letter in letters]
        if arguments.json:
            _output(arguments, found, ())
        else:
            _output(arguments, found, ("task_id", "function", "reason"))

    async def do_letters_requeue(self, arguments: argparse.Namespace) -> None:
        settings = get_settings()
        main = names.task_queue(arguments.queue, settings)
        error_queue = names.error_queue(main)
        task_id = None if arguments.all else arguments.task_id
        done = await queues.requeue(settings, task_id, queue=arguments.queue)
        if not done.moved and not done.refused and arguments.all:
            _say(
                arguments,
                {"requeued": 0, "text": f"the error queue {error_queue} is empty: nothing to requeue"},
            )
            return
        if not done.moved and not done.refused:
            raise Failure(f"no dead letter of task {arguments.task_id} in {error_queue}")
        ids = [letter.describe()["task_id"] for letter in done.moved]
        refused = [{"task_id": letter.describe()["task_id"], "reason": why} for letter, why in done.refused]
        text = f"requeued {len(done.moved)} into {main}"
        if refused:
            text += f"; refused {len(refused)}, left in {error_queue}:"
            # one line each: a newline in an id or a reason must not make lines of its own
            text += "".join(
                f"\n  {terminal_safe(str(entry['task_id']))}: {terminal_safe(entry['reason'])}"
                for entry in refused
            )
        _say(arguments, {"requeued": len(done.moved), "task_ids": ids, "refused": refused, "text": text})
        if refused:
            self.exit_code = 1  # a script sees that not everything went back

    async def do_letters_purge(self, arguments: argparse.Namespace) -> None:
        settings = get_settings()
        count = await queues.purge(settings, arguments.queue)
        error_queue = names.error_queue(names.task_queue(arguments.queue, settings))
        _say(arguments, {"purged": count, "text": f"purged {count} messages from {error_queue}"})


def _queue_name(text: str) -> str:
    """--queue's value: a name RabbitMQ takes (or "default"), else argparse's usage error."""
    try:
        return text if text == names.DEFAULT_QUEUE else names.check_queue_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def quiet_logging(config: dict) -> dict:
    """A copy of a logging dictConfig whose root and loggers log warnings and errors only."""
    config = copy.deepcopy(config)
    loggers = [config.setdefault("root", {}), *(config.get("loggers") or {}).values()]
    for logger in loggers:
        if isinstance(logger, dict) and logging.getLevelName(str(logger.get("level", "WARNING")).upper()) in (
            logging.DEBUG,
            logging.INFO,
            logging.NOTSET,
        ):
            logger["level"] = "WARNING"
    return config


async def _existing(task_id: str) -> dict[str, Any]:
    try:
        return await TaskState(task_id).get_state()
    except TaskNotFoundException:
        raise Failure(f"no task {task_id}") from None


async def _scan(status: str | None, function: str | None, limit: int) -> list[dict[str, Any]]:
    """Every state of the store, newest first (what --container avoids: it reads them all)."""
    manager = get_state_manager()
    ids = [task_id async for task_id in manager.list()]
    found = []
    for start in range(0, len(ids), SCAN_BATCH):
        batch = ids[start : start + SCAN_BATCH]
        for task_id, (state, times) in zip(batch, await manager.index_entries(batch)):
            task = task_index.summary(task_id, state, times) if state else None
            if task and task_index.matches(task, status, function):
                found.append((state.get("updated") or 0, task))
    found.sort(key=lambda pair: pair[0], reverse=True)
    return [task for _, task in found[:limit]]


def _seconds(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}s" if value < 60 else f"{value / 60:.1f}m" if value < 3600 else f"{value / 3600:.1f}h"


def _cell(column: str, value: Any) -> str:
    if column in ("age", "duration"):
        return _seconds(value)
    return "-" if value is None else terminal_safe(str(value))


def _print(text: str, file: Any = None) -> None:
    """Print one line or block made of message text, made safe for a terminal. The lines of
    JSON output and tables are whole, their own newlines kept."""
    print("\n".join(terminal_safe(line) for line in text.split("\n")), file=file)


def _output(arguments: argparse.Namespace, rows: list[dict[str, Any]], columns: tuple[str, ...]) -> None:
    """`rows` as JSON, or as a table aligned on its widest cells."""
    if arguments.json:
        _print(json.dumps(rows, indent=2, default=str))
        return
    table = [[column.upper().replace("_", " ") for column in columns]]
    table += [[_cell(column, row.get(column)) for column in columns] for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        _print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())


def _say(arguments: argparse.Namespace, result: dict[str, Any]) -> None:
    """One result: JSON for scripts, its text (or its fields) for people."""
    if arguments.json:
        _print(json.dumps({k: v for k, v in result.items() if k != "text"}, default=str))
    else:
        _print(result.get("text") or " ".join(f"{k}={v}" for k, v in result.items()))
