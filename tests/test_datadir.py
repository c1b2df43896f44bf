"""The data dir trusts nothing around it: planted symlinks, foreign owners, loose modes.

Every file the node writes into its data dir goes through `p2pfl.datadir`: unpredictable
temp names opened with O_EXCL|O_NOFOLLOW, fsync, rename; a dir or key file that another
user could tamper with is refused before it is used; config checks run before anything
is created on disk; one running node per data dir (a lock file).
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import trio
import trio.testing

from p2pfl.config import ConfigError, NodeConfig
from p2pfl.datadir import DataDir, append_line
from p2pfl.fatal import DataDirInUse, DataDirUnusable, DiskFull
from p2pfl.identity import KEY_FILE_NAME, Identity, IdentityError
from p2pfl.node import CHECKPOINT_FILE, METRICS_FILE, Node
from p2pfl.storage import Checkpoint, atomic_write, load_checkpoint, save_checkpoint
from p2pfl.transport.memory import MemoryNetwork, MemoryTransport


def ckpt(r: int) -> Checkpoint:
    return Checkpoint(r, np.full(8, r, np.float32), {}, [{"round": r}], "softmax")


def private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    path.chmod(0o700)
    return path


# ---- planted symlinks -------------------------------------------------------------------


def test_checkpoint_write_never_follows_a_planted_symlink(tmp_path: Path) -> None:
    """Symlinks at every temp name a writer could predict, and at the target, stay unused."""
    data = private_dir(tmp_path / "data")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    path = data / CHECKPOINT_FILE
    # The names the old code used (pid-based) and a few likely variants.
    for name in (
        f".{CHECKPOINT_FILE}.tmp-{os.getpid()}",
        f".{CHECKPOINT_FILE}.tmp",
        f"{CHECKPOINT_FILE}.tmp",
    ):
        (data / name).symlink_to(victim)
    save_checkpoint(path, ckpt(3))
    assert victim.read_bytes() == b"precious"
    got = load_checkpoint(path)
    assert got is not None and got.round == 3
    assert not path.is_symlink()


def test_a_symlink_at_the_checkpoint_path_is_replaced_not_written_through(
    tmp_path: Path,
) -> None:
    data = private_dir(tmp_path / "data")
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    (data / CHECKPOINT_FILE).symlink_to(victim)
    atomic_write(data / CHECKPOINT_FILE, b"new")
    assert victim.read_bytes() == b"precious"
    assert (data / CHECKPOINT_FILE).read_bytes() == b"new"


def test_temp_names_are_unpredictable_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = private_dir(tmp_path / "data")
    seen: list[tuple[str, int]] = []
    real_replace = os.replace

    def spy(src: str, dst: str) -> None:
        seen.append((os.path.basename(src), stat.S_IMODE(os.lstat(src).st_mode)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    for _ in range(3):
        atomic_write(data / "f", b"x")
    names = [name for name, _ in seen]
    assert len(set(names)) == 3, names  # a fresh random name each time
    assert all(mode == 0o600 for _, mode in seen)
    assert sorted(os.listdir(data)) == ["f"]  # no temp file left behind


def test_metrics_append_refuses_a_planted_symlink(tmp_path: Path) -> None:
    data = private_dir(tmp_path / "data")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (data / METRICS_FILE).symlink_to(victim)
    with pytest.raises(DataDirUnusable, match="symbolic link"):
        append_line(data / METRICS_FILE, '{"round": 0}')
    assert victim.read_text() == "precious\n"


def test_metrics_append_isolates_a_torn_last_line(tmp_path: Path) -> None:
    """A crash mid-append leaves a partial line; the next row must not be glued to it."""
    path = private_dir(tmp_path / "data") / METRICS_FILE
    path.write_text('{"round": 0}\n{"rou')
    append_line(path, '{"round": 1}')
    assert path.read_text().splitlines() == ['{"round": 0}', '{"rou', '{"round": 1}']


def test_metrics_file_is_created_private(tmp_path: Path) -> None:
    path = private_dir(tmp_path / "data") / METRICS_FILE
    append_line(path, "{}")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_node_metrics_do_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    """Through the node itself: the round's metrics row refuses the link, the victim is safe."""
    data = private_dir(tmp_path / "n0")
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    (data / METRICS_FILE).symlink_to(victim)
    node = single_node(data)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await node.done.wait()
            nursery.cancel_scope.cancel()

    with pytest.raises(BaseException) as info:
        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    assert any(isinstance(e, DataDirUnusable) for e in leaves(info.value)), info.value
    assert victim.read_text() == "precious\n"


# ---- who may touch the data dir ---------------------------------------------------------


@pytest.mark.parametrize("mode", [0o770, 0o707, 0o777, 0o720])
def test_a_data_dir_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    data = private_dir(tmp_path / "data")
    data.chmod(mode)
    with pytest.raises(DataDirUnusable) as info:
        DataDir.open(data)
    message = str(info.value)
    assert str(data) in message and f"chmod 700 {data}" in message and "\n" not in message
    assert not (data / "lock").exists()
    # The same check guards the identity, so `p2pfl keys show` refuses too.
    with pytest.raises(DataDirUnusable, match="chmod 700"):
        Identity.load_or_create(data)
    assert not (data / KEY_FILE_NAME).exists()


def test_a_sticky_world_writable_dir_is_still_refused(tmp_path: Path) -> None:
    data = private_dir(tmp_path / "data")
    data.chmod(0o1777)
    with pytest.raises(DataDirUnusable, match="chmod 700"):
        DataDir.open(data)


def test_a_data_dir_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = private_dir(tmp_path / "data")
    me = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: me + 1)
    with pytest.raises(DataDirUnusable) as info:
        DataDir.open(data)
    message = str(info.value)
    assert str(data) in message and "chown" in message and f"uid {me}" in message
    with pytest.raises(DataDirUnusable, match="chown"):
        Identity.load_or_create(data)
    assert not (data / KEY_FILE_NAME).exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a dir to another user")
def test_a_data_dir_really_owned_by_nobody_is_refused(tmp_path: Path) -> None:
    data = private_dir(tmp_path / "data")
    os.chown(data, 65534, 65534)
    with pytest.raises(DataDirUnusable, match="owned by uid 65534"):
        DataDir.open(data)


def test_a_path_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataDirUnusable, match="not a directory"):
        DataDir.open(tmp_path / "file")


def test_a_new_data_dir_is_created_private(tmp_path: Path) -> None:
    dd = DataDir.open(tmp_path / "a" / "b")
    try:
        assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "a" / "b" / "lock").stat().st_mode) == 0o600
    finally:
        dd.close()


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_a_key_file_others_can_write_is_refused(tmp_path: Path, mode: int) -> None:
    data = private_dir(tmp_path / "data")
    Identity.load_or_create(data)
    key = data / KEY_FILE_NAME
    key.chmod(mode)
    with pytest.raises(IdentityError) as info:
        Identity.load_or_create(data)
    assert f"chmod 600 {key}" in str(info.value)
    assert isinstance(info.value, DataDirUnusable)  # same exit code as any unusable data dir


def test_a_key_file_owned_by_another_user_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = private_dir(tmp_path / "data")
    Identity.load_or_create(data)
    real_stat = os.fstat
    key_ino = (data / KEY_FILE_NAME).stat().st_ino

    class Foreign:
        def __init__(self, st: os.stat_result) -> None:
            self._st = st

        def __getattr__(self, name: str) -> object:
            return getattr(self._st, name) if name != "st_uid" else os.geteuid() + 1

    def fake_fstat(fd: int) -> object:
        st = real_stat(fd)
        return Foreign(st) if st.st_ino == key_ino else st

    monkeypatch.setattr(os, "fstat", fake_fstat)
    with pytest.raises(IdentityError, match="chown"):
        Identity.load_or_create(data)


def test_a_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    data = private_dir(tmp_path / "data")
    elsewhere = private_dir(tmp_path / "other")
    Identity.load_or_create(elsewhere)
    (data / KEY_FILE_NAME).symlink_to(elsewhere / KEY_FILE_NAME)
    with pytest.raises(IdentityError, match="symbolic link"):
        Identity.load_or_create(data)


# ---- one node per data dir --------------------------------------------------------------


def test_the_lock_admits_one_holder_at_a_time(tmp_path: Path) -> None:
    first = DataDir.open(tmp_path / "d")
    with pytest.raises(DataDirInUse) as info:
        DataDir.open(tmp_path / "d")
    message = str(info.value)
    assert "in use" in message and f"pid {os.getpid()}" in message and "--data-dir" in message
    first.close()
    second = DataDir.open(tmp_path / "d")  # released on close
    second.close()


def test_a_lock_file_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    data = private_dir(tmp_path / "data")
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (data / "lock").symlink_to(victim)
    with pytest.raises(DataDirUnusable, match="symbolic link"):
        DataDir.open(data)
    assert victim.read_text() == "precious"


# ---- config checks before the disk ------------------------------------------------------


def single_node(data: Path, **fields: object) -> Node:
    cfg = NodeConfig(
        data_dir=data,
        listen="mem:n0",
        dataset="synthetic",
        min_peers=0,
        rounds=1,
        **fields,  # type: ignore[arg-type]
    ).validated()
    ident = Identity.from_seed(b"\x07" * 32)
    return Node(
        cfg,
        identity=ident,
        transport=MemoryTransport(MemoryNetwork(), ident, "mem:n0"),
        train_in_thread=False,
        control_socket=False,
    )


@pytest.mark.parametrize(
    ("fields", "name"),
    [
        ({"aggregation": "nonsense"}, "aggregation"),
        ({"aggregation": "krum", "aggregation_options": {"nonsense": 1}}, "aggregation"),
        ({"compression": ("topk:7",)}, "compression"),
        ({"attack": "nonsense"}, "attack"),
    ],
)
def test_config_errors_are_found_before_anything_is_created(
    tmp_path: Path, fields: dict[str, object], name: str
) -> None:
    data = tmp_path / "data"
    cfg = NodeConfig(data_dir=data, listen="127.0.0.1:0", dataset="synthetic", **fields)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as info:
        Node(cfg.validated(), control_socket=False)
    assert info.value.field == name
    assert not data.exists()  # no data dir, no identity.key


def test_an_unreadable_dataset_is_a_config_error_before_the_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from p2pfl.learning import datasets

    monkeypatch.setattr(datasets, "DIGITS_FILE", tmp_path / "gone" / "digits.npz")
    datasets._digits_raw.cache_clear()
    datasets._load_split.cache_clear()
    data = tmp_path / "data"
    try:
        with pytest.raises(ConfigError, match=r"digits.npz cannot be read"):
            Node(NodeConfig(data_dir=data, listen="127.0.0.1:0").validated())
    finally:
        datasets._digits_raw.cache_clear()
        datasets._load_split.cache_clear()
    assert not data.exists()


def test_a_too_long_socket_path_is_refused_before_the_disk(tmp_path: Path) -> None:
    data = tmp_path / ("d" * 110)
    with pytest.raises(DataDirUnusable, match="shorter --data-dir"):
        Node(NodeConfig(data_dir=data, listen="127.0.0.1:0", dataset="synthetic").validated())
    assert not data.exists()


def test_an_unreadable_secret_file_is_a_config_error_before_the_disk(tmp_path: Path) -> None:
    data = tmp_path / "data"
    cfg = NodeConfig(
        data_dir=data, listen="127.0.0.1:0", dataset="synthetic", secret_file=tmp_path / "none"
    )
    with pytest.raises(ConfigError, match="secret_file"):
        Node(cfg.validated(), control_socket=False)
    assert not data.exists()


def test_a_node_holds_the_lock_until_its_run_ends(tmp_path: Path) -> None:
    node = single_node(tmp_path / "n0")
    with pytest.raises(DataDirInUse):
        single_node(tmp_path / "n0")

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(node.run)
            await node.done.wait()
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
    again = single_node(tmp_path / "n0")  # the ended run released it
    assert again.machine.round == 1  # and resumed from the checkpoint
    again.close()


# ---- disk full --------------------------------------------------------------------------


def test_disk_full_while_writing_a_checkpoint_is_fatal_and_leaves_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = private_dir(tmp_path / "data")
    path = data / CHECKPOINT_FILE
    save_checkpoint(path, ckpt(4))

    def full(fd: int, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(DiskFull) as info:
        save_checkpoint(path, ckpt(5))
    monkeypatch.undo()
    message = str(info.value)
    assert str(path) in message and "free" in message and "\n" not in message
    assert sorted(os.listdir(data)) == [CHECKPOINT_FILE]  # the temp file is gone
    got = load_checkpoint(path)
    assert got is not None and got.round == 4


def test_a_read_only_data_dir_is_unusable_not_a_bare_errno(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = private_dir(tmp_path / "data")
    real_open = os.open

    def read_only(path: object, flags: int, *args: object, **kwargs: object) -> int:
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(DataDirUnusable, match="read-only"):
        atomic_write(data / CHECKPOINT_FILE, b"x")


def leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for sub in exc.exceptions for leaf in leaves(sub)]
    return [exc]
