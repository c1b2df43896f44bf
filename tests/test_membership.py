"""The sans-IO peer table: dial targets, backoff, liveness, peer exchange."""

from __future__ import annotations

from p2pfl.membership import PeerState, PeerTable


def table(**kw: object) -> PeerTable:
    return PeerTable("me", **kw)  # type: ignore[arg-type]


def test_bootstrap_address_is_due_then_backs_off_exponentially_with_jitter() -> None:
    t = table(backoff_base=0.5, backoff_max=30.0, seed=1)
    assert t.add_address("10.0.0.1:7470", peer_id=None, found_via="bootstrap")
    assert not t.add_address("10.0.0.1:7470", peer_id=None, found_via="bootstrap")
    assert [x.address for x in t.due_targets(0.0)] == ["10.0.0.1:7470"]
    delays = []
    now = 0.0
    for _ in range(10):
        t.dial_started("10.0.0.1:7470")
        assert t.due_targets(now) == []  # in flight
        delay = t.dial_failed("10.0.0.1:7470", now)
        delays.append(delay)
        assert t.due_targets(now + delay * 0.99) == []
        now += delay
        assert len(t.due_targets(now)) == 1
    nominal = [min(30.0, 0.5 * 2**i) for i in range(10)]
    for d, n in zip(delays, nominal, strict=True):
        assert 0.5 * n <= d <= 1.5 * n
    assert max(delays) <= 45.0


def test_own_id_and_connected_peers_are_never_dialed() -> None:
    t = table()
    assert not t.add_address("a:1", peer_id="me", found_via="peer-exchange")
    t.add_address("b:1", peer_id="b", found_via="peer-exchange")
    t.connected("b", now=0.0, found_via="peer-exchange")
    assert t.due_targets(0.0) == []
    t.add_address("self:1", peer_id=None, found_via="bootstrap")
    t.dial_started("self:1")
    t.dial_succeeded("self:1", "me")  # it was us
    assert t.due_targets(100.0) == []


def test_short_lived_connections_back_off_and_stable_ones_redial_promptly() -> None:
    t = table(seed=0)
    t.add_address("b:1", peer_id="b", found_via="bootstrap")
    now = 0.0
    for _ in range(5):
        t.dial_started("b:1")
        t.dial_succeeded("b:1", "b")
        delay = t.connection_ended("b:1", now, lasted=0.01, stable=6.0)
        now += delay
    assert t.targets["b:1"].failures == 5
    t.dial_started("b:1")
    t.dial_succeeded("b:1", "b")
    assert t.connection_ended("b:1", now, lasted=60.0, stable=6.0) == t.backoff_base
    assert t.targets["b:1"].failures == 0


def test_a_failed_claim_can_be_replaced_by_another_claim_for_the_same_address() -> None:
    t = table()
    t.add_address("c:1", peer_id="spoofed", found_via="mdns")
    t.dial_started("c:1")
    t.dial_failed("c:1", 0.0)
    # The real owner's record arrives: its claim replaces the failed one, dial soon.
    assert t.add_address("c:1", peer_id="real", found_via="mdns")
    assert t.targets["c:1"].peer_id == "real"
    assert [x.address for x in t.due_targets(0.0)] == ["c:1"]
    # A claim that has not failed is not overwritten by a competing one.
    assert not t.add_address("c:1", peer_id="other", found_via="mdns")
    assert t.targets["c:1"].peer_id == "real"


def test_addresses_learnt_from_peers_are_bounded() -> None:
    t = table(max_peers=4)
    added = sum(
        t.add_address(f"h{i}:1", peer_id=f"p{i}", found_via="peer-exchange") for i in range(100)
    )
    assert added == 16  # 4 x max_peers


def test_failure_detector_and_states() -> None:
    t = table()
    t.connected("a", now=0.0, found_via="inbound")
    t.connected("b", now=0.0, found_via="inbound")
    t.seen("a", 5.0)
    assert t.silent_peers(7.0, timeout=6.0) == ["b"]
    t.disconnected("b", PeerState.FAILED)
    assert t.connected_ids() == ["a"]
    assert t.peers["b"].state is PeerState.FAILED
    t.set_listen_address("a", "10.0.0.9:7470")
    assert t.exchange_list() == [("a", "10.0.0.9:7470")]
    snap = t.snapshot(8.0)
    assert [p["id"] for p in snap] == ["a", "b"]
    assert snap[0]["last_seen_s"] == 3.0 and snap[1]["state"] == "failed"


def test_a_peer_that_stops_answering_pings_is_reported_unresponsive() -> None:
    t = PeerTable("me")
    t.connected("a", now=0.0, found_via="bootstrap")
    t.connected("b", now=0.0, found_via="bootstrap")
    for now in (1.0, 2.0, 3.0, 4.0):
        t.pinged("a", now)
        t.pinged("b", now)
        t.seen("b", now)  # b keeps sending (a stalled reader still talks)
        t.ponged("a")  # only a answers
    assert t.unresponsive_peers(4.0, after=2.0) == ["b"]  # pending since 1.0
    assert t.unresponsive_peers(2.5, after=2.0) == []  # not yet long enough
    t.ponged("b")
    assert t.unresponsive_peers(9.0, after=2.0) == []
    t.pinged("b", 10.0)
    t.disconnected("b")
    assert t.unresponsive_peers(20.0, after=2.0) == []  # only connected peers count
    t.connected("b", now=21.0, found_via="bootstrap")  # a new connection starts afresh
    assert t.unresponsive_peers(30.0, after=2.0) == []
