"""The Ray runner (`p2pfl scenario run --ray`) on a local Ray that these tests start.

The Ray tests skip, saying why, when the extra is absent (`pip install -e '.[ray]'`);
the `[ray]` table's parsing is checked either way. Every node listens on 127.0.0.1
(a one-machine Ray cluster means loopback) and the Ray instance is local only.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from p2pfl.scenario.schema import RunFailed, ScenarioError, load_scenario, parse_scenario

SMALL = """
name = "{name}"
nodes = 4
rounds = {rounds}
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
num_cpus = {num_cpus}
memory = "64MiB"
{extra}
"""


def _scenario(tmp_path: Path, name: str, *, rounds: int = 3, num_cpus: float = 0.5,
              extra: str = "") -> Path:  # fmt: skip
    path = tmp_path / f"{name}.toml"
    path.write_text(SMALL.format(name=name, rounds=rounds, num_cpus=num_cpus, extra=extra))
    return path


def test_ray_table_is_parsed_and_checked() -> None:
    s = parse_scenario({"nodes": 2, "ray": {"num_cpus": 0.25, "memory": "1.5GiB"}})
    assert (s.ray.num_cpus, s.ray.memory) == (0.25, int(1.5 * 2**30))
    assert parse_scenario({"nodes": 2, "ray": {"memory": 1000}}).ray.memory == 1000
    assert parse_scenario({"nodes": 2}).ray.memory is None  # no reservation by default
    for bad, message in [
        ({"num_cpus": 0}, "ray.num_cpus: must be > 0"),
        ({"num_cpus": "two"}, "ray.num_cpus: expected a number"),
        ({"memory": "a lot"}, "ray.memory: expected bytes or a size"),
        ({"memory": 0}, "ray.memory: must be > 0"),
        ({"gpus": 1}, "ray.gpus: unknown key"),
    ]:
        with pytest.raises(ScenarioError, match=message):
            parse_scenario({"nodes": 2, "ray": bad})


@pytest.fixture(scope="module")
def ray_local() -> Iterator[Any]:
    ray = pytest.importorskip("ray", reason="needs Ray: pip install -e '.[ray]'")
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        namespace="p2pfl",
        _node_ip_address="127.0.0.1",
    )
    try:
        yield ray
    finally:
        ray.shutdown()


def _free_block(size: int) -> int:
    """The first port of `size` consecutive ports free on 127.0.0.1 just now."""
    for low in range(30000, 32000, size):
        with contextlib.ExitStack() as stack:
            try:
                for port in range(low, low + size):
                    stack.enter_context(socket.socket()).bind(("127.0.0.1", port))
            except OSError:
                continue
        return low
    pytest.skip(f"no {size} consecutive free ports on 127.0.0.1")


def _our_actors(ray: Any) -> list[str]:
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["name"].startswith("p2pfl-scenario")
    ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _final_accuracy(metrics: dict[str, Any]) -> float:
    value = metrics["summary"]["final"]["accuracy_mean"]
    assert isinstance(value, float)
    return value


def test_same_accuracy_as_the_process_runner(ray_local: Any, tmp_path: Path) -> None:
    from p2pfl.scenario.cli import run_scenario

    low = _free_block(8)
    ports = f'ports = "{low}-{low + 7}"'  # ignored by the process runner
    scenario = load_scenario(_scenario(tmp_path, "parity", extra=ports))
    t0 = time.monotonic()
    on_ray = run_scenario(scenario, tmp_path / "ray", show_progress=False, ray="")
    t1 = time.monotonic()
    processes = run_scenario(scenario, tmp_path / "proc", show_progress=False)
    t2 = time.monotonic()
    print(f"ray {t1 - t0:.1f} s, processes {t2 - t1:.1f} s")
    assert on_ray["mode"] == "ray" and on_ray["complete"]
    written = json.loads((tmp_path / "ray" / "metrics.json").read_text())
    assert written["mode"] == "ray"
    for name, rec in on_ray["nodes"].items():
        assert [r["round"] for r in rec["rounds"]] == [0, 1, 2], name
        assert rec["host"] == "127.0.0.1" and rec["peer_id"]
        assert low <= int(rec["listen"].rpartition(":")[2]) <= low + 7, rec["listen"]
        # A one-machine cluster keeps the data dirs in the output folder, as processes do.
        assert (tmp_path / "ray" / "nodes" / name / "metrics.jsonl").is_file()
    # Same seed, same data, same model: the engine must not change what is learned.
    assert _final_accuracy(on_ray) > 0.5
    assert abs(_final_accuracy(on_ray) - _final_accuracy(processes)) < 0.05
    assert _our_actors(ray_local) == []


def test_a_crash_fault_kills_the_actor_and_a_restart_resumes_the_node(
    ray_local: Any, tmp_path: Path
) -> None:
    from p2pfl.scenario.ray_runner import run_ray

    # Latency makes a round last about a second (as in scenarios/churn.toml), so the
    # crash lands mid-run and the node is down for a while, not after the last round.
    faults = """
[[faults]]
at_round = 0
kind = "delay"
delay = 0.3
[[faults]]
at_round = 1
kind = "crash"
nodes = [3]
[[faults]]
at_round = 2
kind = "restart"
nodes = [3]
"""
    scenario = load_scenario(_scenario(tmp_path, "churn", rounds=4, extra=faults))
    records, _ = run_ray(scenario, tmp_path / "out")
    crash, restart = records["n3"]["events"]
    assert (crash["kind"], restart["kind"]) == ("crash", "restart")
    assert crash["round"] < 3  # killed mid-run...
    assert restart["pid"] != crash["pid"]  # ...and a new actor process took over
    assert not _alive(crash["pid"])
    # The new actor ran the node on the same data dir (the same identity, the same
    # address) and it finished, catching up from its peers (its rows may skip the
    # rounds it missed; whether a checkpoint was on disk depends on where it was killed).
    log = (Path(records["n3"]["data_dir"]) / "node.log").read_text()
    starts = re.findall(r"node (\w+) listening on (\S+)", log)
    assert len(starts) == 2 and starts[0] == starts[1], log[-2000:]
    assert "finished 4 rounds" in log.split(f"listening on {starts[1][1]}")[-1]
    assert all(r["rounds"][-1]["round"] == 3 for n, r in records.items() if n != "n3")
    assert _our_actors(ray_local) == []


def test_an_interrupt_leaves_no_actor_and_no_node(ray_local: Any, tmp_path: Path) -> None:
    from p2pfl.scenario.ray_runner import run_ray

    scenario = load_scenario(_scenario(tmp_path, "interrupt", rounds=50))
    seen: dict[str, Any] = {}

    def ctrl_c_after_round_one(nodes: list[Any]) -> None:
        seen["pids"] = [n.pid for n in nodes]
        seen["names"] = _our_actors(ray_local)
        if all(len((n.status or {}).get("history") or []) >= 1 for n in nodes):
            raise KeyboardInterrupt  # where a Ctrl-C lands: in the runner's watch loop

    with pytest.raises(KeyboardInterrupt):
        run_ray(scenario, tmp_path / "out", on_poll=ctrl_c_after_round_one)
    assert len(seen["names"]) == 4  # they did exist, under these names
    end = time.monotonic() + 15
    while (_our_actors(ray_local) or any(map(_alive, seen["pids"]))) and time.monotonic() < end:
        time.sleep(0.1)
    assert _our_actors(ray_local) == []
    assert not [pid for pid in seen["pids"] if _alive(pid)]


def test_a_scenario_the_cluster_cannot_hold_is_refused_up_front(
    ray_local: Any, tmp_path: Path
) -> None:
    from p2pfl.scenario.ray_runner import run_ray

    scenario = load_scenario(_scenario(tmp_path, "big", num_cpus=1))
    with pytest.raises(RunFailed, match=r"need 4 CPUs; the Ray cluster has 2"):
        run_ray(scenario, tmp_path / "out")
    assert _our_actors(ray_local) == []


def test_too_few_free_ports_in_the_range_fail_naming_host_range_and_count(
    ray_local: Any, tmp_path: Path
) -> None:
    from p2pfl.scenario.ray_runner import run_ray

    low = _free_block(2)
    extra = f'ports = "{low}-{low + 1}"'
    scenario = load_scenario(_scenario(tmp_path, "narrow", extra=extra))
    expected = (
        f'host 127.0.0.1: \\[ray\\] ports = "{low}-{low + 1}" has 2 free ports there, '
        "and the 4 nodes Ray placed on that host need 4"
    )
    with pytest.raises(RunFailed, match=expected):
        run_ray(scenario, tmp_path / "out")
    assert _our_actors(ray_local) == []
