"""The Ray runner on a three-machine Ray cluster, emulated with network namespaces.

Three "hosts" A, B, C are network namespaces on one bridge (`p2pfl.discovery.netns`,
private addresses 10.231.19.x that exist only inside them; this machine's interfaces are
never touched and nothing here does mDNS: the scenario uses bootstrap peers). Each host
runs `ray start` as a real cluster member would (A the head, B and C joining it, token
authentication on, every port Ray listens on pinned), and the runner is the CLI, run on
A: `p2pfl scenario run FILE --ray 10.231.19.1:6379`. So this is the recipe of
docs/deploy.md section 7, step by step, with namespaces for machines.

What the namespaces cannot give: separate filesystems. Each host gets its own TMPDIR
and Ray temp dir, and the test checks that the rows of the nodes on B and C reach
metrics.json through Ray, not through files the driver reads.

Runs only as root with `ip netns` working and Ray installed; skips saying why otherwise.
The fixture always stops every `ray start` (by pid, then whatever is left in the
namespaces), deletes the namespaces and the files, then checks that nothing is left.
`ray stop` is not used: it kills every Ray process of the machine by name, not only
this cluster's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from p2pfl.discovery import netns

pytest.importorskip("ray", reason="needs Ray: pip install -e '.[ray]'")

SUBNET = "10.231.19"
HOSTS = 3
CPUS_PER_HOST = 2
GCS_PORT = 6379
# Every port a Ray node listens on, pinned so a firewall can name them (deploy.md, 7).
RAY_PORTS = {
    "--node-manager-port": 6380,
    "--object-manager-port": 6381,
    "--runtime-env-agent-port": 6382,
    "--dashboard-agent-grpc-port": 6383,
    "--dashboard-agent-listen-port": 6384,
    "--metrics-export-port": 6385,
}
WORKER_PORTS = (10002, 10100)  # --min-worker-port / --max-worker-port
NODE_PORTS = (7000, 7009)  # the scenario's [ray] ports: the p2pfl nodes listen only there
# The head's autoscaler serves Prometheus metrics on all interfaces, on this fixed port
# (env AUTOSCALER_METRIC_PORT): for monitoring only, no member dials it.
AUTOSCALER_METRICS_PORT = 44217
CLUSTER_UP_TIMEOUT = 60.0
DRIVER_TIMEOUT = 150.0
STOP_TIMEOUT = 40.0  # `ray start --block` drains its node for up to 30 s on SIGTERM

SCENARIO = """
name = "multihost"
nodes = 6
rounds = 3
seed = 3
[topology]
kind = "full"
[data]
dataset = "digits"
[model]
name = "softmax"
[training]
epochs = 1
[protocol]
round_timeout = 8.0
heartbeat_interval = 0.5
heartbeat_timeout = 3.0
[ray]
num_cpus = 1
memory = "64MiB"
ports = "7000-7009"
"""


@dataclass
class Cluster:
    lab: netns.Lab
    root: Path  # everything of this test: Ray temp dirs, TMPDIRs, outputs
    env: dict[str, str]  # the environment every host and the driver share
    head: str  # the GCS address, HOST:PORT
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def tmpdir(self, i: int) -> Path:
        return self.root / f"h{i}"

    def run(self, i: int, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.lab.argv(i, argv),
            env={**self.env, "TMPDIR": str(self.tmpdir(i))},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _ray_cli() -> list[str]:
    return [sys.executable, "-m", "ray.scripts.scripts"]


def _ray_start(c: Cluster, i: int) -> None:
    ip = c.lab.addresses[i]
    argv = [*_ray_cli(), "start", "--block", f"--node-ip-address={ip}",
            f"--num-cpus={CPUS_PER_HOST}", f"--temp-dir={c.tmpdir(i) / 'ray'}",
            *(f"{flag}={port}" for flag, port in RAY_PORTS.items()),
            f"--min-worker-port={WORKER_PORTS[0]}", f"--max-worker-port={WORKER_PORTS[1]}",
            "--disable-usage-stats"]  # fmt: skip
    if i == 0:
        argv += ["--head", f"--port={GCS_PORT}", "--include-dashboard=false"]
    else:
        argv += [f"--address={c.head}"]
    c.tmpdir(i).mkdir(parents=True, exist_ok=True)
    log = (c.root / f"ray-h{i}.log").open("wb")
    c.procs.append(
        subprocess.Popen(
            c.lab.argv(i, argv),
            env={**c.env, "TMPDIR": str(c.tmpdir(i))},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C of pytest reaches it only through the fixture
        )
    )


def _active_nodes(c: Cluster) -> int:
    try:
        done = c.run(0, [*_ray_cli(), "status", f"--address={c.head}"], timeout=30)
    except subprocess.TimeoutExpired:
        return 0
    if done.returncode != 0:
        return 0
    active = done.stdout.split("Active:", 1)[-1].split("Pending:", 1)[0]
    return len(re.findall(r"^\s*1 node_", active, flags=re.MULTILINE))


def _wait_for_nodes(c: Cluster, n: int) -> None:
    deadline = time.monotonic() + CLUSTER_UP_TIMEOUT
    while time.monotonic() < deadline:
        if any(p.poll() is not None for p in c.procs):
            break
        if _active_nodes(c) >= n:
            return
        time.sleep(0.5)
    logs = "\n---\n".join(
        (c.root / f"ray-h{i}.log").read_text(errors="replace")[-2000:] for i in range(len(c.procs))
    )
    pytest.fail(f"the Ray cluster did not reach {n} nodes in {CLUSTER_UP_TIMEOUT:.0f} s:\n{logs}")


def _pids(namespace: str) -> list[int]:
    done = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, check=False
    )
    return [int(p) for p in done.stdout.split()]


def _stop(c: Cluster) -> list[str]:
    """Stop the cluster: SIGTERM to each `ray start --block` (it stops its node's
    processes), then SIGKILL, by pid, to whatever still runs in our namespaces (all of
    it started by this test). Returns what had to be killed."""
    for p in c.procs:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in c.procs:
        try:
            p.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    forced: list[str] = []
    deadline = time.monotonic() + 15
    while any(_pids(h) for h in c.lab.hosts) and time.monotonic() < deadline:
        time.sleep(0.2)
    for host in c.lab.hosts:
        for pid in _pids(host):
            forced.append(f"{host}:{pid}")
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while any(_pids(h) for h in c.lab.hosts) and time.monotonic() < deadline:
        time.sleep(0.1)
    return forced


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    reason = netns.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    if shutil.which("ss") is None:
        pytest.skip("the `ss` command (iproute2) is not installed")
    # Short: Ray's unix sockets live under --temp-dir and a socket path has 107 bytes.
    root = Path(tempfile.mkdtemp(prefix="p2rb"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    # Ray >= 2.5x authenticates cluster members with a token when one is set: give the
    # same fresh one to every host and the driver, never the user's ~/.ray/auth_token.
    env |= {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    tag = ""
    try:
        with netns.lab(HOSTS, subnet=SUBNET) as lab:
            tag = lab.tag
            c = Cluster(lab, root, env, f"{lab.addresses[0]}:{GCS_PORT}")
            try:
                for i in range(HOSTS):  # B and C retry until A's GCS answers
                    _ray_start(c, i)
                _wait_for_nodes(c, HOSTS)
                yield c
            finally:
                forced = _stop(c)
                left = {h: _pids(h) for h in lab.hosts}
        assert all(not pids for pids in left.values()), f"processes survived: {left}"
        # Not a failure of the runner, but worth knowing: `ray start --block` should
        # have stopped everything it started.
        if forced:
            print(f"killed after `ray start` had stopped: {forced}")
        assert netns.leftover_namespaces(tag) == []
    finally:
        shutil.rmtree(root, ignore_errors=True)
    assert not root.exists()


def _addr(text: str) -> tuple[str, int]:
    """`ss`'s "10.0.0.1:80", "[::ffff:10.0.0.1]:80", "127.0.0.53%lo:53", "*:80", "*:*"."""
    addr, _, port = text.rpartition(":")
    addr = addr.strip("[]").split("%")[0].removeprefix("::ffff:")
    return addr, int(port) if port.isdigit() else 0


@dataclass
class Sockets:
    """What one host's namespace showed in `ss` over the run."""

    listening: set[tuple[str, int]] = field(default_factory=set)  # (address, port)
    owners: dict[int, str] = field(default_factory=dict)  # port -> command line
    dialed: set[int] = field(default_factory=set)  # listening ports other hosts used

    def add(self, ss_output: str, others: set[str]) -> None:
        established = []
        for line in ss_output.splitlines():
            fields = line.split()  # State Recv-Q Send-Q Local:Port Peer:Port Process
            local, peer = _addr(fields[3]), _addr(fields[4])
            if fields[0] == "LISTEN":
                self.listening.add(local)
                pid = re.search(r"pid=(\d+)", " ".join(fields[5:]))
                if pid and local[1] not in self.owners:
                    with contextlib.suppress(OSError):
                        cmd = Path(f"/proc/{pid[1]}/cmdline").read_bytes()
                        self.owners[local[1]] = cmd.replace(b"\0", b" ").decode()[:300]
            elif fields[0] == "ESTAB" and peer[0] in others:
                established.append(local[1])
        ports = {port for _, port in self.listening}
        self.dialed |= {port for port in established if port in ports}

    def exposed(self) -> set[tuple[str, int]]:
        """Listening sockets another machine could reach (not loopback-only)."""
        return {(a, p) for a, p in self.listening if not (a.startswith("127.") or a == "::1")}


def _sample(c: Cluster, into: list[Sockets]) -> None:
    """One `ss` of every host's TCP sockets, the hosts at once."""
    procs = [
        subprocess.Popen(
            c.lab.argv(i, ["ss", "-Htanp"]), stdout=subprocess.PIPE, text=True, env=c.env
        )
        for i in range(HOSTS)
    ]
    for i, proc in enumerate(procs):
        out, _ = proc.communicate(timeout=10)
        into[i].add(out, set(c.lab.addresses) - {c.lab.addresses[i]})


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    wall: float
    seen: list[Sockets]  # what every host's namespace showed in `ss` meanwhile

    def failure(self) -> str:
        return f"stdout:\n{self.stdout[-3000:]}\nstderr:\n{self.stderr[-3000:]}"


def _drive(c: Cluster, scenario: Path, out: Path, timeout: float = 90) -> Run:
    """`p2pfl scenario run FILE --ray HEAD --out OUT` on host A, watching the sockets."""
    argv = [sys.executable, "-m", "p2pfl", "scenario", "run", str(scenario),
            "--ray", c.head, "--out", str(out), "--timeout", str(timeout)]  # fmt: skip
    logs = c.root / f"{out.name}.stdout", c.root / f"{out.name}.stderr"
    t0 = time.monotonic()
    with logs[0].open("wb") as o, logs[1].open("wb") as e:
        driver = subprocess.Popen(
            c.lab.argv(0, argv), env={**c.env, "TMPDIR": str(c.tmpdir(0))}, stdout=o, stderr=e
        )
    seen = [Sockets() for _ in range(HOSTS)]
    try:
        while driver.poll() is None and time.monotonic() - t0 < DRIVER_TIMEOUT:
            _sample(c, seen)
            time.sleep(0.1)
    finally:
        if driver.poll() is None:
            driver.kill()  # the runner's actors die with it: Ray kills an owner's actors
        driver.wait()
    wall = time.monotonic() - t0
    stdout, stderr = (path.read_text(errors="replace") for path in logs)
    return Run(driver.returncode, stdout, stderr, wall, seen)


def test_a_scenario_runs_on_three_hosts_through_the_cli(cluster: Cluster) -> None:
    c = cluster
    scenario = c.root / "multihost.toml"
    scenario.write_text(SCENARIO)
    out = c.root / "out"
    run = _drive(c, scenario, out)
    seen = run.seen
    print(f"three-host scenario: {run.wall:.1f} s from the CLI's start to its exit")
    for i, ip in enumerate(c.lab.addresses):
        print(f"host {ip}: listened on {sorted(p for _, p in seen[i].exposed())}, "
              f"dialed from the other hosts on {sorted(seen[i].dialed)}")  # fmt: skip
    assert run.returncode == 0, run.failure()
    stdout = run.stdout

    # The outputs of the process runner: metrics.json, the table, the plot.
    assert "final accuracy mean" in stdout and "outputs in" in stdout
    assert (out / "accuracy.png").stat().st_size > 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["mode"] == "ray" and metrics["complete"] is True
    assert set(metrics) == {"scenario", "mode", "complete", "nodes", "summary", "wall_seconds"}
    records: dict[str, Any] = metrics["nodes"]
    assert sorted(records) == [f"n{i}" for i in range(6)]

    # Spread over the three machines (each holds 2 CPUs = 2 nodes), each node listening
    # on its machine's address, never on loopback.
    by_host: dict[str, list[str]] = {}
    for name, rec in records.items():
        assert rec["host"] in c.lab.addresses, (name, rec["host"])
        assert rec["listen"].rpartition(":")[0] == rec["host"], rec["listen"]
        by_host.setdefault(rec["host"], []).append(name)
    assert {h: len(v) for h, v in by_host.items()} == {a: 2 for a in c.lab.addresses}

    # Every node finished every round, heard all five others (so TCP + TLS across the
    # hosts worked) and learned: the same accuracy everywhere on a full mesh.
    for name, rec in records.items():
        rows = rec["rounds"]
        assert [r["round"] for r in rows] == [0, 1, 2], name
        assert rows[-1]["peers_heard"] == 5, (name, rows[-1])
        assert rows[-1]["accuracy"] > 0.85, (name, rows[-1]["accuracy"])
        assert rec["peer_id"] and rec["peak_rss_bytes"] > 0

    # Data dirs: the nodes on the driver's host (A) in the output folder, as with
    # processes; the others in their own host's temp dir, from where their log and
    # records (never their key or checkpoints) come back into the output folder through
    # Ray, as do their rows in metrics.json. The run succeeded, so the data dirs on B
    # and C (and their run folder) are gone; A's are the output and stay.
    a = c.lab.addresses[0]
    assert sorted(p.name for p in (out / "nodes").iterdir()) == sorted(records)
    for i, ip in enumerate(c.lab.addresses):
        for name in by_host[ip]:
            data_dir = Path(records[name]["data_dir"])
            if ip == a:
                assert data_dir == out / "nodes" / name
                assert (data_dir / "identity.key").is_file()  # A's own: never removed
                continue
            assert data_dir.is_relative_to(c.tmpdir(i) / "p2pfl-ray"), data_dir
            assert not data_dir.exists() and not data_dir.parent.exists(), data_dir
            copied = out / "nodes" / name
            assert sorted(p.name for p in copied.iterdir()) == [
                "command.txt", "metrics.jsonl", "node.log"
            ]  # fmt: skip
            assert f"--data-dir {data_dir}" in (copied / "command.txt").read_text()
            jsonl = (copied / "metrics.jsonl").read_text().splitlines()
            assert [json.loads(line)["round"] for line in jsonl] == [0, 1, 2], name
            log = (copied / "node.log").read_text()
            assert f"listening on {records[name]['listen']}" in log and "finished 3 rounds" in log

    # What listened on the hosts' addresses: Ray's pinned ports and worker range, the
    # head's GCS and autoscaler metrics ports, and the nodes' own ports. Nothing else:
    # the port list of deploy.md section 7 is complete.
    ports_of = {ip: {int(records[n]["listen"].rpartition(":")[2]) for n in by_host[ip]}
                for ip in c.lab.addresses}  # fmt: skip
    # Every node's port is in the scenario's [ray] ports: what a firewall would open.
    for ip, ports in ports_of.items():
        assert len(ports) == 2 and all(NODE_PORTS[0] <= p <= NODE_PORTS[1] for p in ports), (
            ip,
            ports,
        )
    for i, ip in enumerate(c.lab.addresses):
        allowed = set(RAY_PORTS.values()) | ports_of[ip]
        if i == 0:
            allowed |= {GCS_PORT, AUTOSCALER_METRICS_PORT}
        exposed = seen[i].exposed()
        other = {
            (addr, port, seen[i].owners.get(port))
            for addr, port in exposed
            if port not in allowed and not WORKER_PORTS[0] <= port <= WORKER_PORTS[1]
        }
        assert other == set(), f"host {ip} listened on unlisted ports: {sorted(other)}"
        assert {addr for addr, _ in exposed} <= {ip, "0.0.0.0", "*"}
        assert ports_of[ip] <= {port for _, port in exposed}  # the sampling saw them
    # Nodes connected across hosts. (A pair keeps one connection, to one of its two
    # listen ports: so some host's node ports, not necessarily every host's.)
    assert any(ports_of[ip] & seen[i].dialed for i, ip in enumerate(c.lab.addresses))

    # Nothing of the run is left on the cluster: no node listens any more.
    after = [Sockets() for _ in range(HOSTS)]
    _sample(c, after)
    for i, ip in enumerate(c.lab.addresses):
        assert not {port for _, port in after[i].listening} & ports_of[ip]

    # The same file, unchanged, with the process runner (on A's loopback): same kind of
    # outputs, same accuracy for the same seed.
    proc_out = c.root / "proc"
    done = c.run(
        0,
        [sys.executable, "-m", "p2pfl", "scenario", "run", str(scenario), "--out",
         str(proc_out), "--timeout", "90"],
        timeout=DRIVER_TIMEOUT,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (proc_out / "accuracy.png").is_file() and "final accuracy mean" in done.stdout
    processes = json.loads((proc_out / "metrics.json").read_text())
    assert processes["mode"] == "processes" and set(processes) == set(metrics)
    final = metrics["summary"]["final"]["accuracy_mean"]
    assert abs(final - processes["summary"]["final"]["accuracy_mean"]) < 0.05
    print(f"final accuracy: ray on 3 hosts {final:.3f}, processes "
          f"{processes['summary']['final']['accuracy_mean']:.3f}")  # fmt: skip


CHURN = """
[[faults]]
at_round = 0
kind = "delay"
delay = 0.3
[[faults]]
at_round = 1
kind = "crash"
nodes = [0, 1, 2]
[[faults]]
at_round = 2
kind = "restart"
nodes = [0, 1, 2]
"""


def test_a_crashed_node_restarts_on_its_own_host(cluster: Cluster) -> None:
    """Crash = ray.kill of the actor wherever it runs; restart = a new actor pinned to
    the same Ray node, on the data dir it left there. Three of the six nodes crash, so
    at least one of them is on B or C (A holds two)."""
    c = cluster
    scenario = c.root / "churn.toml"
    scenario.write_text(SCENARIO.replace("rounds = 3", "rounds = 4") + CHURN)
    out = c.root / "churn"
    run = _drive(c, scenario, out)
    print(f"three-host churn scenario: {run.wall:.1f} s")
    assert run.returncode == 0, run.failure()
    records = json.loads((out / "metrics.json").read_text())["nodes"]
    remote = 0
    for name in ("n0", "n1", "n2"):
        rec = records[name]
        crash, restart = rec["events"]
        assert (crash["kind"], restart["kind"]) == ("crash", "restart")
        assert restart["pid"] != crash["pid"]
        # The new actor ran on the same host, the same address and data dir: both runs
        # are in its log (for a node on B or C, the copy the runner brought back).
        log = (out / "nodes" / name / "node.log").read_text()
        starts = re.findall(r"node (\w+) listening on (\S+)", log)
        assert len(starts) == 2 and starts[0] == starts[1] == (starts[0][0], rec["listen"])
        assert "finished 4 rounds" in log.split(f"listening on {rec['listen']}")[-1]
        remote += rec["host"] != c.lab.addresses[0]
        # The restart kept its port, so it is still in the range.
        assert NODE_PORTS[0] <= int(rec["listen"].rpartition(":")[2]) <= NODE_PORTS[1]
    assert remote >= 1
    # A successful run: every remote data dir is gone, also those of restarted nodes.
    for rec in records.values():
        if rec["host"] != c.lab.addresses[0]:
            assert not Path(rec["data_dir"]).exists(), rec["data_dir"]
    for name in ("n3", "n4", "n5"):
        assert [r["round"] for r in records[name]["rounds"]] == [0, 1, 2, 3], name


def test_a_failed_run_still_brings_back_every_nodes_log_and_rows(cluster: Cluster) -> None:
    """The deadline passes mid-run (RunFailed): before the actors are killed, the logs
    and records of the nodes on B and C are copied to A, so the partial metrics.json
    (rebuilt from `<out>/nodes/n<i>/metrics.jsonl`) has their rounds too. A failed run
    keeps their data dirs on B and C, and its error says where they are."""
    c = cluster
    scenario = c.root / "long.toml"
    scenario.write_text(SCENARIO.replace("rounds = 3", "rounds = 500"))
    out = c.root / "long"
    run = _drive(c, scenario, out, timeout=7)
    print(f"three-host failed scenario: {run.wall:.1f} s")
    assert run.returncode == 1, run.failure()
    assert "timed out" in run.stdout + run.stderr, run.failure()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["complete"] is False
    for i in range(6):
        assert "listening on" in (out / "nodes" / f"n{i}" / "node.log").read_text()
        assert metrics["nodes"][f"n{i}"]["rounds"], f"n{i} has no rows"
    assert "the data dirs of the nodes on other machines are kept there" in run.stderr + run.stdout
    kept = [d for i in (1, 2) for d in (c.tmpdir(i) / "p2pfl-ray").glob(f"{out.name}-*/n*")]
    assert len(kept) == 4, kept  # 2 nodes on each of B and C
    for data_dir in kept:
        assert str(data_dir.parent) in run.stderr + run.stdout  # named in the error
        assert (data_dir / "identity.key").is_file()
        # The copies are those files, as they were when copied (the node ran on).
        copied = out / "nodes" / data_dir.name
        assert (copied / "command.txt").read_bytes() == (data_dir / "command.txt").read_bytes()
        for f in ("metrics.jsonl", "node.log"):
            assert (data_dir / f).read_bytes().startswith((copied / f).read_bytes()), f


def test_what_a_remote_node_sends_back_is_its_log_and_records_only(tmp_path: Path) -> None:
    """`NodeHost.files` (no Ray needed): never the key, lock or checkpoints; a file over
    the limit is cut at a line start, a cut log says where the rest is."""
    from p2pfl.scenario.ray_runner import NodeHost

    host = NodeHost()
    host._data_dir = tmp_path
    for name in ("identity.key", "lock", "checkpoint.msgpack", "command.txt"):
        (tmp_path / name).write_bytes(b"x\n")
    (tmp_path / "node.log").write_text("".join(f"line {i}\n" for i in range(100)))
    (tmp_path / "metrics.jsonl").write_text("".join(f'{{"round": {i}}}\n' for i in range(50)))
    files = host.files(limit=64)
    assert sorted(files) == ["command.txt", "metrics.jsonl", "node.log"]
    first, *rest = files["node.log"].decode().splitlines()
    assert first.startswith("[") and first.endswith(f"are in {tmp_path / 'node.log'} on its host]")
    assert rest[-1] == "line 99" and all(line.startswith("line ") for line in rest)
    assert [json.loads(line)["round"] for line in files["metrics.jsonl"].splitlines()][-1] == 49
    assert len(files["metrics.jsonl"]) <= 64
    assert host.files()["node.log"] == (tmp_path / "node.log").read_bytes()
