"""The Ray actor of the Ray runner: one scenario node, on whatever machine Ray puts it.

It runs the ordinary `Node` under trio in a thread the actor owns, so the actor stays
free to answer `poll()`; it reports the node's status and rows, and at the end sends
back the node's log and records (never its key or checkpoints). The driver side, which
places, watches, crashes and restarts these actors, is `ray_runner.py`.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any

from p2pfl.scenario.processes import QUERY_TIMEOUT, _log_tail, node_argv, node_rows

# What a node on another machine sends back into `<out>/nodes/n<i>` at the end: its log
# and records, never its key, lock or checkpoints. Each file is cut to its last
# COLLECT_LIMIT bytes (at a line start).
COLLECTED_FILES = ("node.log", "metrics.jsonl", "command.txt", "privacy.json")
COLLECT_LIMIT = 8 * 2**20
NODE_START_TIMEOUT = 60.0  # one node loading its data and binding its port


class NodeHost:
    """Holds one p2pfl node for the runner (wrapped with `ray.remote` at run time).

    The node runs in `trio.run` on a thread this actor starts; trio is in charge of
    the node, Ray only of the process. The actor's methods run on Ray's own thread, so
    `poll` is answered while the node trains. `stop` asks the node to say goodbye; a
    crash needs no method: `ray.kill` takes the whole process, node included.
    """

    def __init__(self) -> None:
        self._thread: threading.Thread | None = None
        self._token: Any = None  # trio.lowlevel.TrioToken once the node runs
        self._stop: Any = None  # trio.Event
        self._started = threading.Event()
        self._error: str | None = None
        self._data_dir: Path | None = None
        self._status: dict[str, Any] | None = None

    def where(self) -> dict[str, Any]:
        """Which Ray node this actor is on, its address, pid and temp folder."""
        import ray

        util: Any = ray.util  # typed or not depending on the Ray version: Any either way
        return {
            "node_id": ray.get_runtime_context().get_node_id(),
            "ip": util.get_node_ip_address(),
            "pid": os.getpid(),
            "tmp": tempfile.gettempdir(),
        }

    def free_ports(self, host: str, n: int, ports: tuple[int, int] | None = None) -> list[int]:
        """n distinct free TCP ports on `host` of this machine, all held open while
        choosing them (so two nodes of this machine never get the same one); free again
        until the nodes bind them, the same small race as the process runner's.

        `ports` (`[ray] ports`, inclusive): choose only there, lowest first, so that a
        firewall can name the nodes' ports; the list is then shorter than n when the
        range has fewer free ports (the runner says which machine, and how many it
        needed). None: any port the kernel hands out (its ephemeral range)."""
        import errno
        import socket

        socks: list[socket.socket] = []
        try:
            if ports is None:
                for _ in range(n):
                    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    socks.append(s)
                    s.bind((host, 0))
                return [s.getsockname()[1] for s in socks]
            for port in range(ports[0], ports[1] + 1):
                if len(socks) == n:
                    break
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                # As the node's own listener (trio sets SO_REUSEADDR): a port whose
                # last connections linger in TIME_WAIT is one the node can bind.
                # listen() then keeps any other socket, reuse or not, off it meanwhile.
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind((host, port))
                    s.listen(1)
                except OSError as exc:
                    s.close()
                    if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                        continue
                    raise
                socks.append(s)
            return [s.getsockname()[1] for s in socks]
        finally:
            for s in socks:
                s.close()

    def remove_dirs(self, data_dirs: list[str]) -> list[str]:
        """Delete these data dirs of nodes of this machine (their files were copied to
        the runner's output folder; the run succeeded), then their run folder if that
        is left empty. Returns the dirs removed.

        Only ever under `<this machine's temp dir>/p2pfl-ray/`, where the runner puts
        the data dirs of nodes off its own machine: any other path is refused here, so
        a mistake on the runner's side can never reach a user's output folder."""
        import shutil

        root = Path(tempfile.gettempdir()).resolve() / "p2pfl-ray"
        removed: list[str] = []
        parents: set[Path] = set()
        for raw in data_dirs:
            path = Path(raw).resolve()
            if path.parent.parent != root:  # <root>/<run>/n<i>, nothing else
                continue
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(raw)
            parents.add(path.parent)
        for run_dir in parents:
            with contextlib.suppress(OSError):  # not empty: another node's dir is left
                run_dir.rmdir()
        return removed

    def identity(self, data_dir: str) -> str:
        """Create the node's identity now, so fault plans can name peers by id."""
        from p2pfl.identity import Identity

        d = Path(data_dir)
        d.mkdir(parents=True, exist_ok=True, mode=0o700)
        return Identity.load_or_create(d).peer_id

    def write_plan(self, plan: Any, path: str) -> None:
        """Write a node's network-fault plan on this host (where its node reads it)."""
        from p2pfl.transport.faults import dump_fault_plan

        Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        dump_fault_plan(plan, Path(path))

    def start(self, values: dict[str, Any]) -> int:
        """Start the node with these NodeConfig values; returns once it listens (or
        raises with the reason and its log's tail). Returns this process's pid."""
        from p2pfl.config import NodeConfig
        from p2pfl.logs import setup_logging

        cfg = NodeConfig(**values).validated()
        self._data_dir = Path(cfg.data_dir)
        self._data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        # The command that runs the same node by hand, as the process runner writes it.
        (self._data_dir / "command.txt").write_text(" ".join(node_argv(values)) + "\n")
        log = (self._data_dir / "node.log").open("a", buffering=1)
        setup_logging(cfg.log_level, cfg.log_format, stream=log)
        self._thread = threading.Thread(target=self._run, args=(cfg,), daemon=True)
        self._thread.start()
        if not self._started.wait(NODE_START_TIMEOUT) or self._error is not None:
            raise RuntimeError(
                f"node did not start: {self._error or 'timed out'}\n"
                f"{_log_tail(self._data_dir / 'node.log')}"
            )
        return os.getpid()

    def _run(self, cfg: Any) -> None:
        import trio

        try:
            trio.run(self._main, cfg)
        except BaseException as exc:  # the thread's end: keep the reason for poll()
            self._error = f"{type(exc).__name__}: {exc}"
        finally:
            self._started.set()

    async def _main(self, cfg: Any) -> None:
        import trio

        from p2pfl.api import open_node

        self._stop = trio.Event()
        async with open_node(cfg):  # goodbye to the peers when the block ends
            self._token = trio.lowlevel.current_trio_token()
            self._started.set()
            await self._stop.wait()

    def poll(self) -> dict[str, Any]:
        """The node's status as `p2pfl status --json` shows it (None if the control
        socket did not answer this time), and whether the node is still running."""
        from p2pfl.control.client import ControlError, query

        alive = self._thread is not None and self._thread.is_alive()
        status = None
        if alive and self._data_dir is not None:
            with contextlib.suppress(ControlError):
                status = query(self._data_dir / "control.sock", timeout=QUERY_TIMEOUT)
        if status is not None:
            self._status = status
        out: dict[str, Any] = {"alive": alive, "status": status}
        if not alive:
            out["error"] = self._error or "the node stopped"
            if self._data_dir is not None:
                out["log_tail"] = _log_tail(self._data_dir / "node.log")
        return out

    def files(self, limit: int = COLLECT_LIMIT) -> dict[str, bytes]:
        """The node's COLLECTED_FILES as they are on this host, each cut to its last
        `limit` bytes from a line start (a cut log starts with a line saying so)."""
        found: dict[str, bytes] = {}
        if self._data_dir is None:
            return found
        for name in COLLECTED_FILES:
            path = self._data_dir / name
            try:
                with path.open("rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    f.seek(max(0, size - limit))
                    data = f.read(limit)
            except OSError:
                continue
            if size > limit:
                data = data[data.find(b"\n") + 1 :]
                if name == "node.log":
                    note = f"[{size - len(data)} earlier bytes are in {path} on its host]\n"
                    data = note.encode() + data
            found[name] = data
        return found

    def rows(self) -> list[dict[str, Any]]:
        """Every round's row (metrics.jsonl on this host, else the last status)."""
        if self._data_dir is None:
            return []
        return node_rows(self._data_dir, (self._status or {}).get("history") or [])

    def stop(self, grace: float) -> dict[str, Any]:
        """Stop the node cleanly (goodbye), then report its rows, last status and peak RSS."""
        import trio

        if self._thread is not None and self._thread.is_alive() and self._token is not None:
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            self._thread.join(grace)
        return {
            "rows": self.rows(),
            "status": self._status,
            "peak_rss_bytes": _peak_rss_self(),
            "stopped": self._thread is None or not self._thread.is_alive(),
        }


def _peak_rss_self() -> int | None:
    """This actor process's VmHWM (the node plus Ray's worker runtime)."""
    from p2pfl.scenario.processes import _peak_rss

    return _peak_rss(os.getpid())


# ---- the runner ------------------------------------------------------------------------
