"""Memory and import cost of one real `p2pfl node` process, against what its fixed
dependencies cost on their own (issue 17, "a lean node process").

Run: python benchmarks/bench_node_footprint.py

Measured in one run, each in a fresh interpreter:
- floors: a bare interpreter, + numpy, + trio/ssl/msgpack, + cryptography (x509,
  Ed25519): what any node pays before a line of p2pfl runs;
- an idle node (`--rounds 0`, no peer), read once it logs that it listens;
- two nodes peering (`--peer`), 3 rounds each, read after both finished;
- 8 idle nodes at once (mean per node, and their PSS summed): shared pages split;
- idle nodes under `-X importtime` (3, the median shown): total import time and the
  third-party top-level packages they loaded.

RSS is /proc/<pid>/status: VmRSS (resident now), RssAnon (heap, private), RssFile
(mapped code and data, shared between processes of the same interpreter), VmHWM
(peak); PSS and USS from smaps_rollup (USS: pages no other process maps, which
is what each further node process costs). Nodes listen on 127.0.0.1 only, mDNS
off. Prints a rich table and writes benchmarks/results/bench_node_footprint.json.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results" / "bench_node_footprint.json"
TIMEOUT = 120.0  # seconds a node may take to listen or to finish its rounds
SETTLE = 1.0  # seconds after "listening" before reading an idle node's RSS
FIELDS = ("VmRSS", "RssAnon", "RssFile", "VmHWM")
ROLLUP = ("Pss", "Private_Clean", "Private_Dirty")  # /proc/<pid>/smaps_rollup
COLUMNS = (*FIELDS, "Pss", "USS")
MANY = 8  # idle nodes at once: how shared code pages split between node processes
IDLE_REPEATS = 3  # idle nodes started one after another; the median by VmRSS is shown
NODE = [sys.executable, "-m", "p2pfl", "node", "--listen", "127.0.0.1:0", "--no-mdns"]
FLOORS = {
    "interpreter": "pass",
    "+ numpy": "import numpy",
    "+ trio ssl msgpack": "import numpy, trio, ssl, msgpack",
    "+ cryptography": (
        "import numpy, trio, ssl, msgpack, cryptography.x509, "
        "cryptography.hazmat.primitives.asymmetric.ed25519"
    ),
}
LISTENING = re.compile(r"p2pfl\.node: node \S+ listening on (\S+)")


def parse(status_text: str, rollup_text: str) -> dict[str, float]:
    """MiB of the RSS fields of /proc/<pid>/status and of PSS and USS (private pages:
    what one more such process adds, the shared code pages aside) from smaps_rollup."""
    kb = {
        name: int(m.group(1))
        for name in (*FIELDS, *ROLLUP)
        for text in (status_text, rollup_text)
        if (m := re.search(rf"^{name}:\s+(\d+) kB", text, re.M))
    }
    out = {name: kb[name] / 1024 for name in (*FIELDS, "Pss") if name in kb}
    if "Private_Clean" in kb and "Private_Dirty" in kb:
        out["USS"] = (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024
    return out


def status(pid: int) -> dict[str, float]:
    proc = Path(f"/proc/{pid}")
    rollup = proc / "smaps_rollup"
    return parse((proc / "status").read_text(), rollup.read_text() if rollup.exists() else "")


def floor(code: str) -> dict[str, float]:
    """RSS of an interpreter that ran `code` and nothing else."""
    probe = (
        f"{code}\nimport pathlib\nfor f in ('status', 'smaps_rollup'):\n"
        "    p = pathlib.Path('/proc/self', f)\n"
        "    print(p.read_text() if p.exists() else '', end='\\0')"
    )
    text = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    status_text, rollup_text, _ = text.split("\0")
    return parse(status_text, rollup_text)


class Node:
    """One `p2pfl node` process whose stderr is read by a thread (lines kept)."""

    def __init__(self, data_dir: Path, *flags: str, python_flags: tuple[str, ...] = ()) -> None:
        cmd = [NODE[0], *python_flags, *NODE[1:], "--data-dir", str(data_dir), *flags]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self.address: str | None = None
        self.listening = threading.Event()
        self.finished = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)
            if (m := LISTENING.search(line)) is not None:
                self.address = m.group(1)
                self.listening.set()
            if "finished " in line and " rounds" in line:
                self.finished.set()
        self.listening.set()  # ended: whoever waits finds out from `address`
        self.finished.set()

    def wait(self, event: threading.Event) -> None:
        if not event.wait(TIMEOUT) or self.proc.poll() is not None:
            tail = "".join(self.lines[-15:])
            raise RuntimeError(f"node did not get there (exit {self.proc.poll()}):\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)


def import_profile(lines: list[str]) -> dict[str, Any]:
    """Total import time and third-party top-level packages from `-X importtime` lines."""
    rows = []
    for line in lines:
        if line.startswith("import time:") and "cumulative" not in line:
            self_us, _, name = line.split(":", 1)[1].split("|")
            rows.append((int(self_us), name.strip()))
    stdlib = sys.stdlib_module_names
    tops = sorted(
        {n.split(".")[0] for _, n in rows}
        - set(stdlib)
        - {"p2pfl", "site", "sitecustomize", "encodings"}
    )
    # A failed optional import (bcrypt for cryptography's ssh keys, Jython's `org` for
    # pickle) shows up too: marked, since it costs a path search and no memory.
    third = [
        t if importlib.util.find_spec(t) is not None else f"{t} (failed attempt)"
        for t in tops
        if not t.startswith("_")
    ]
    ours = sorted({n for _, n in rows if n.startswith("p2pfl")})
    return {
        "import_seconds": round(sum(us for us, _ in rows) / 1e6, 3),
        "modules": len(rows),
        "third_party": third,
        "p2pfl_modules": ours,
    }


def run(tmp: Path) -> dict[str, Any]:
    nodes: list[Node] = []
    try:
        out: dict[str, Any] = {"floors": {k: floor(c) for k, c in FLOORS.items()}}

        idle_runs = []
        for i in range(IDLE_REPEATS):
            idle = Node(tmp / f"idle{i}", "--rounds", "0")
            nodes.append(idle)
            idle.wait(idle.listening)
            time.sleep(SETTLE)
            idle_runs.append(status(idle.proc.pid))
            idle.stop()
        idle_runs.sort(key=lambda r: r["VmRSS"])
        out["idle node"] = idle_runs[len(idle_runs) // 2]
        out["idle node VmRSS runs"] = [r["VmRSS"] for r in idle_runs]

        a = Node(tmp / "a", "--rounds", "3")
        nodes.append(a)
        a.wait(a.listening)
        assert a.address is not None
        b = Node(tmp / "b", "--rounds", "3", "--peer", a.address)
        nodes.append(b)
        for n in (a, b):
            n.wait(n.finished)
        peers = [status(n.proc.pid) for n in (a, b)]
        out["2 peers, 3 rounds"] = {k: sum(p[k] for p in peers) / len(peers) for k in peers[0]}
        for n in (a, b):
            n.stop()

        many = [Node(tmp / f"many{i}", "--rounds", "0") for i in range(MANY)]
        nodes.extend(many)
        for n in many:
            n.wait(n.listening)
        time.sleep(SETTLE)
        rows = [status(n.proc.pid) for n in many]
        out[f"{MANY} idle at once"] = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
        out[f"{MANY} idle at once, Pss sum"] = sum(r["Pss"] for r in rows)
        for n in many:
            n.stop()

        profiles = []
        for i in range(IDLE_REPEATS):  # import time varies with load: the median run
            prof = Node(tmp / f"prof{i}", "--rounds", "0", python_flags=("-X", "importtime"))
            nodes.append(prof)
            prof.wait(prof.listening)
            prof.stop()
            profiles.append(import_profile(prof.lines))
        profiles.sort(key=lambda p: p["import_seconds"])
        out["imports"] = profiles[len(profiles) // 2]
        out["imports"]["import_seconds_runs"] = [p["import_seconds"] for p in profiles]
        return out
    finally:
        for n in nodes:
            n.stop()


def main() -> None:
    from rich.console import Console
    from rich.table import Table

    with tempfile.TemporaryDirectory(prefix="p2pfl-footprint-") as tmp:
        res = run(Path(tmp))
    floors = res["floors"]
    cryptography_floor = floors["+ cryptography"]["VmRSS"]
    table = Table(title="one p2pfl node process (MiB; 'vs floor' = VmRSS / deps' floor)")
    table.add_column("process")
    for col in (*COLUMNS, "vs floor"):
        table.add_column(col, justify="right")
    for name in (*floors, "idle node", "2 peers, 3 rounds", f"{MANY} idle at once"):
        row = floors.get(name) or res[name]
        cells = [f"{row[k]:.1f}" if k in row else "-" for k in COLUMNS]
        table.add_row(name, *cells, f"{row['VmRSS'] / cryptography_floor:.2f}x")
    imp = res["imports"]
    table.caption = (
        f"idle node imports: {imp['modules']} modules in {imp['import_seconds']:.3f} s "
        f"(-X importtime self times); third-party: {', '.join(imp['third_party'])}; "
        f"{len(imp['p2pfl_modules'])} p2pfl modules; {MANY} idle nodes at once: "
        f"{res[f'{MANY} idle at once, Pss sum']:.0f} MiB Pss in all; load average "
        f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    Console().print(table)
    res["machine"] = {
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg_1min": os.getloadavg()[0],
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
