"""`[ray] ports` and `[ray] keep_remote` without Ray: the range's parsing and checks,
`NodeHost.free_ports` choosing inside a range, and `NodeHost.remove_dirs` deleting only
a remote node's data dir (the actor class is a plain class until `ray.remote` wraps it,
so these run without the extra)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfl.scenario.ray_host import NodeHost
from p2pfl.scenario.schema import ScenarioError, parse_scenario


def _ray(table: dict[str, object]) -> object:
    return parse_scenario({"nodes": 2, "ray": table}).ray


def test_the_port_range_is_parsed() -> None:
    spec = parse_scenario({"nodes": 2, "ray": {"ports": "7000-7099"}}).ray
    assert spec.ports == (7000, 7099) and spec.keep_remote is False
    assert parse_scenario({"nodes": 2, "ray": {"ports": " 7000 - 7000 "}}).ray.ports == (
        7000,
        7000,
    )
    assert parse_scenario({"nodes": 2, "ray": {"ports": "1024-65535"}}).ray.ports == (
        1024,
        65535,
    )
    default = parse_scenario({"nodes": 2}).ray
    assert default.ports is None and default.keep_remote is False  # today's behaviour
    assert parse_scenario({"nodes": 2, "ray": {"keep_remote": True}}).ray.keep_remote


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("7000", r'ray\.ports: expected a range such as "7000-7099", got \'7000\''),
        ("7000:7099", r"ray\.ports: expected a range"),
        ("a-b", r"ray\.ports: expected a range"),
        ("-7000-7099", r"ray\.ports: expected a range"),
        (7000, r"ray\.ports: expected a range"),
        ([7000, 7099], r"ray\.ports: expected a range"),
        ("7099-7000", r"ray\.ports: the range 7099-7000 is empty \(low > high\)"),
        ("80-8080", r"ray\.ports: the range 80-8080 must lie within 1024-65535"),
        ("60000-70000", r"ray\.ports: the range 60000-70000 must lie within 1024-65535"),
    ],
)
def test_a_bad_port_range_is_one_line_error(raw: object, message: str) -> None:
    with pytest.raises(ScenarioError, match=message) as info:
        _ray({"ports": raw})
    assert "\n" not in str(info.value)


def test_keep_remote_must_be_a_bool() -> None:
    with pytest.raises(ScenarioError, match=r"ray\.keep_remote: expected true or false"):
        _ray({"keep_remote": "yes"})


def _free_block(size: int) -> int:
    """The first port of `size` consecutive ports free on 127.0.0.1 just now."""
    for low in range(20000, 30000, size):
        socks = []
        try:
            for port in range(low, low + size):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return low
    pytest.skip(f"no {size} consecutive free ports on 127.0.0.1")


@pytest.fixture
def block() -> Iterator[int]:
    yield _free_block(6)


def test_free_ports_picks_distinct_ports_inside_the_range(block: int) -> None:
    host = NodeHost()
    got = host.free_ports("127.0.0.1", 4, (block, block + 5))
    assert got == [block, block + 1, block + 2, block + 3]  # lowest first, all distinct
    # Released once chosen: the nodes bind them next.
    for port in got:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_free_ports_skips_taken_ports_and_says_when_too_few(block: int) -> None:
    host = NodeHost()
    with socket.socket() as busy, socket.socket() as bound:
        busy.bind(("127.0.0.1", block + 1))
        busy.listen(1)  # a listener, as another node's
        bound.bind(("127.0.0.1", block + 3))  # bound only, as a socket on its way up
        got = host.free_ports("127.0.0.1", 4, (block, block + 5))
        assert got == [block, block + 2, block + 4, block + 5]
        # Fewer free ports than nodes: the list is short, the runner names the host.
        assert host.free_ports("127.0.0.1", 4, (block, block + 3)) == [block, block + 2]
        assert host.free_ports("127.0.0.1", 2, (block + 1, block + 1)) == []


def test_free_ports_without_a_range_is_the_kernels_choice() -> None:
    got = NodeHost().free_ports("127.0.0.1", 3)
    assert len(set(got)) == 3 and all(p > 0 for p in got)


def test_remove_dirs_deletes_only_a_run_dir_under_this_hosts_p2pfl_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    run = tmp_path / "p2pfl-ray" / "out-123"
    for name in ("n1", "n4"):
        (run / name).mkdir(parents=True)
        (run / name / "identity.key").write_bytes(b"k")
    outside = tmp_path / "out" / "nodes" / "n0"  # a user's output: never touched
    outside.mkdir(parents=True)
    elsewhere = tmp_path / "p2pfl-ray" / "n9"  # not <root>/<run>/n<i>
    elsewhere.mkdir()
    host = NodeHost()
    assert host.remove_dirs([str(run / "n1"), str(outside), str(elsewhere)]) == [str(run / "n1")]
    assert not (run / "n1").exists() and (run / "n4").is_dir()  # n4 still there: run kept
    assert outside.is_dir() and elsewhere.is_dir()
    assert host.remove_dirs([str(run / "n4")]) == [str(run / "n4")]
    assert not run.exists() and (tmp_path / "p2pfl-ray").is_dir()  # the empty run folder too
