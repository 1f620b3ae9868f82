"""The cluster of a multi-worker run, from TF_CONFIG: its training tasks and their addresses, which one this
process is, waiting until the others are up, and naming the one a failed collective lost. No TensorFlow here.

TensorFlow waits for the other tasks in C++ while it creates a MultiWorkerMirroredStrategy: without end, printing
nothing, and deaf to Ctrl-C and SIGTERM (its coordination service takes SIGTERM over). `wait_for_cluster` waits
in Python first, with a deadline, progress lines, and signals that work.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from core.errors import ConfigError, FlowerError, Kind

Log = Callable[[str], None]
TRAINING_KINDS = ("chief", "worker")  # the tasks that train; an evaluator or parameter server does not
PROGRESS_SECONDS = 10.0  # how often waiting says so
TASK_IN_MESSAGE = re.compile(r"/job:(chief|worker)/(?:replica:\d+/)?task:(\d+)")  # how TensorFlow names a task


class ClusterError(FlowerError):
    """The cluster is not complete in time: the message names the tasks and their addresses."""

    kind = Kind.UNAVAILABLE


class WorkerLost(ClusterError):
    """A task of a running multi-worker run went away (killed, crashed, unreachable): the message names it."""


def _tf_config() -> dict | None:
    """TF_CONFIG as a checked document (None without it): a 'cluster' of task lists of "host:port" strings."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None
    cluster = document.get("cluster") if isinstance(document, dict) else None
    if not isinstance(cluster, dict) or not all(
            isinstance(tasks, list) and all(isinstance(t, str) for t in tasks) for tasks in cluster.values()):
        raise ConfigError('TF_CONFIG must be a JSON object whose "cluster" maps task types to lists of '
                          f'"host:port" strings, got {text[:200]!r}')
    for kind, tasks in cluster.items():
        for address in tasks:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f'TF_CONFIG cluster {kind!r} lists {address!r}: each task is "host:port" with a '
                                  "port from 1 to 65535")
    return document


def training_tasks() -> list[tuple[str, str]]:
    """The tasks of TF_CONFIG that train, as (name, "host:port"): the chief, then the workers; [] without it."""
    document = _tf_config()
    if document is None:
        return []
    cluster = document["cluster"]
    return [(f"{kind} {index}", address)
            for kind in TRAINING_KINDS for index, address in enumerate(cluster.get(kind, []))]


def _task() -> tuple[str, int]:
    """This process's task in TF_CONFIG, checked: ('chief' or 'worker', its index in that list)."""
    document = _tf_config()
    task = document.get("task")
    kind, index = (task.get("type"), task.get("index")) if isinstance(task, dict) else (None, None)
    tasks = document["cluster"].get(kind, []) if kind in TRAINING_KINDS else []
    if type(index) is not int or not 0 <= index < len(tasks):
        raise ConfigError("TF_CONFIG 'task' must name type 'chief' or 'worker' and an index into that list of the "
                          f"cluster, got {task!r}")
    return kind, index


def this_task() -> tuple[bool, str]:
    """(whether this process is the chief, its name): the chief is task 'chief', else worker 0 (TF_CONFIG)."""
    if worker_count() <= 1:
        return True, "chief"
    kind, index = _task()
    has_chief = bool(_tf_config()["cluster"].get("chief"))
    return kind == "chief" or (index == 0 and not has_chief), f"{kind} {index}"


def worker_index() -> int:
    """This process's place among the workers (0 for the chief; TF_CONFIG's order: chief, then workers)."""
    if worker_count() <= 1:
        return 0
    kind, index = _task()
    if kind == "chief":
        return 0
    return index + (1 if _tf_config()["cluster"].get("chief") else 0)


def worker_count() -> int:
    """How many machines (processes) train together: the tasks TF_CONFIG names, or 1."""
    return max(len(training_tasks()), 1)


def _accepts(address: str, timeout: float) -> str | None:
    """None when something accepts a TCP connection at "host:port" within `timeout` seconds, else why not."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            return None
    except OSError as err:
        return err.strerror or type(err).__name__


@contextmanager
def _stand_in(name: str, address: str) -> Iterator[socket.socket]:
    """This task's port, listening on every interface (as TensorFlow's server will) while the task waits, so
    that the other tasks see it up while they wait in turn; it accepts and closes what connects."""
    port = int(address.rpartition(":")[2])
    try:
        if socket.has_dualstack_ipv6():  # IPv4 and IPv6 peers alike ('[::1]:2222' in TF_CONFIG)
            sock = socket.create_server(("", port), family=socket.AF_INET6, dualstack_ipv6=True)
        else:
            sock = socket.create_server(("", port))
    except OSError as err:
        raise FlowerError(f"TF_CONFIG gives this task ({name}) the address {address}, but port {port} cannot be "
                          f"listened on here ({err.strerror or err}): is an earlier worker still running?",
                          Kind.CONFLICT) from None
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def _answer(sock: socket.socket) -> None:
    """Accept and close every connection waiting at the stand-in (other tasks looking whether it is up)."""
    while True:
        try:
            sock.accept()[0].close()
        except OSError:  # BlockingIOError: none left
            return


def _listing(tasks: dict[str, str]) -> str:
    """'worker 1 at 127.0.0.1:20001, worker 2 at ...'."""
    return ", ".join(f"{name} at {address}" for name, address in tasks.items())


def wait_for_cluster(timeout: float, log: Log = print, poll: float = 0.5) -> None:
    """Return once every other training task of TF_CONFIG accepts connections at its address (a no-op for one task).

    Says whom it waits for, and every PROGRESS_SECONDS that it still waits; after `timeout` seconds a ClusterError
    names the tasks still missing; Ctrl-C and SIGTERM stop it at once, with a line naming them.
    """
    tasks = dict(training_tasks())
    if len(tasks) < 2:
        return
    me = this_task()[1]
    missing = {name: address for name, address in tasks.items() if name != me}
    started, said = time.monotonic(), None
    with _stand_in(me, tasks[me]) as stand_in:
        try:
            while True:
                reasons = {name: _accepts(address, poll) for name, address in missing.items()}
                missing = {name: address for name, address in missing.items() if reasons[name]}
                waited = time.monotonic() - started
                if not missing:
                    break
                if waited >= timeout:
                    why = "; ".join(f"{name}: {reasons[name]}" for name in missing)
                    raise ClusterError(f"{_listing(missing)} did not come up within {timeout:g} s "
                                       f"(train.cluster_timeout_seconds; {why}): start every task TF_CONFIG names, "
                                       "check their addresses, or give them longer")
                if said is None:
                    log(f"waiting for {_listing(missing)} (this task: {me} at {tasks[me]}; giving up after "
                        f"train.cluster_timeout_seconds={timeout:g} s)")
                    said = waited
                elif waited - said >= PROGRESS_SECONDS:
                    log(f"still waiting for {_listing(missing)} ({waited:.0f} s of {timeout:g} s)")
                    said = waited
                _answer(stand_in)
                time.sleep(poll)
        except (KeyboardInterrupt, SystemExit):  # Ctrl-C, or SIGTERM where the command makes it an exit
            log(f"stopped while waiting for {_listing(missing)}")
            raise
    if said is not None:
        log(f"every task of the cluster is up ({waited:.0f} s)")


def lost_task(message: str) -> str | None:
    """The other training task a failed collective's message names, as 'worker 1 at host:port'; None if none."""
    tasks = dict(training_tasks())
    me = this_task()[1]
    for kind, index in TASK_IN_MESSAGE.findall(message):
        name = f"{kind} {index}"
        if name != me and name in tasks:
            return f"{name} at {tasks[name]}"
    return None
