"""agent.spool.reading: every kind of entry a careless hand leaves under a *.json name.

Real FIFOs, sockets, devices, directories, links and sparse files; each call runs in a
thread with a deadline, so an open that blocks fails the test instead of hanging it.
"""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from agent.errors import NotARegularFile, TooLarge, UnreadableFile
from agent.spool.claims import try_claim
from agent.spool.files import quarantine
from agent.spool.reading import ORDER_FILE_CAP, read_order_file
from agent.spool.record import BufferDirs
from tests.support.harness import tmpfs


async def _soon(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.wait_for(asyncio.to_thread(fn, *args), 5)


def _special(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()  # the socket file stays
    elif kind == "device":
        os.symlink("/dev/null", path)
    return path


@pytest.mark.parametrize("kind", ["fifo", "directory", "socket", "device"])
async def test_special_files_are_refused_without_blocking(tmp_path: Path, kind: str):
    path = _special(tmp_path, kind)
    with pytest.raises(NotARegularFile, match="not a regular file"):
        await _soon(read_order_file, path)
    with pytest.raises(NotARegularFile):
        await _soon(try_claim, path, True)  # the claim opens read-write where it may


async def test_links_are_read_through_or_refused_and_dangling_ones_are_unreadable(tmp_path: Path):
    target = tmp_path / "target.json"
    target.write_bytes(b'{"a": 1}')
    os.symlink(target, tmp_path / "link.json")
    assert read_order_file(tmp_path / "link.json") == b'{"a": 1}'
    claim = try_claim(tmp_path / "link.json")
    assert claim is not None and claim.linked and claim.data == b'{"a": 1}'
    claim.release()
    plain = try_claim(target)
    assert plain is not None and not plain.linked
    plain.release()
    with pytest.raises(NotARegularFile, match="a symbolic link to"):
        read_order_file(tmp_path / "link.json", follow_symlinks=False)
    os.symlink(tmp_path / "nowhere.json", tmp_path / "dangling.json")
    with pytest.raises(UnreadableFile, match="does not exist"):
        read_order_file(tmp_path / "dangling.json")
    with pytest.raises(UnreadableFile, match="does not exist"):
        try_claim(tmp_path / "dangling.json")
    with pytest.raises(FileNotFoundError):  # simply gone: someone moved it
        read_order_file(tmp_path / "gone.json")
    assert try_claim(tmp_path / "gone.json") is None


async def test_the_cap_is_checked_on_the_descriptor_and_holds_exactly(tmp_path: Path):
    path = tmp_path / "sized.json"
    path.write_bytes(b"x" * 100)
    assert len(read_order_file(path, cap=100)) == 100
    with pytest.raises(TooLarge) as info:
        read_order_file(path, cap=99)
    assert (info.value.size, info.value.cap) == (100, 99)
    with open(tmp_path / "sparse.json", "wb") as fh:
        fh.truncate(ORDER_FILE_CAP + 1)
    with pytest.raises(TooLarge, match=f"{ORDER_FILE_CAP + 1} bytes"):
        await _soon(read_order_file, tmp_path / "sparse.json")
    with pytest.raises(TooLarge):
        await _soon(try_claim, tmp_path / "sparse.json", True)


async def test_quarantine_moves_a_link_or_a_fifo_as_it_is_and_touches_no_target(tmp_path: Path):
    dirs = BufferDirs(tmp_path / "buf")
    dirs.ensure()
    target = tmp_path / "theirs.json"
    target.write_bytes(b"{}")
    os.chmod(target, 0o644)
    os.symlink(target, dirs.pending / "L.json")
    os.symlink(tmp_path / "nowhere", dirs.rejected / "F.json")  # a dangling name is taken
    os.mkfifo(dirs.pending / "F.json")
    await _soon(quarantine, dirs, dirs.pending / "L.json", {"reason": "x"})
    await _soon(quarantine, dirs, dirs.pending / "F.json", {"reason": "y"})
    assert os.readlink(dirs.rejected / "L.json") == str(target)
    assert stat.S_IMODE(target.stat().st_mode) == 0o644  # no chmod through the link
    assert stat.S_ISFIFO(os.lstat(dirs.rejected / "F.1.json").st_mode)
    assert os.readlink(dirs.rejected / "F.json") == str(tmp_path / "nowhere")
    reason = orjson.loads((dirs.rejected / "F.1.json.reason.json").read_bytes())
    assert reason["reason"] == "y"
    # Through a link whose content was read: a real copy, only the link goes.
    os.symlink(target, dirs.pending / "C.json")
    await _soon(quarantine, dirs, dirs.pending / "C.json", {"reason": "z"}, b"{}")
    assert not os.path.lexists(dirs.pending / "C.json") and target.exists()
    assert not (dirs.rejected / "C.json").is_symlink()
    assert (dirs.rejected / "C.json").read_bytes() == b"{}"


def test_a_claim_on_a_read_only_filesystem_falls_back_to_reading(tmp_path: Path):
    """A backup mounted read-only: edge-recover's read-write claim still reads it."""
    with tmpfs(tmp_path / "ro") as mount:
        (mount / "o.json").write_bytes(b"{}")
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        claim = try_claim(mount / "o.json", writable=True)
        assert claim is not None and claim.data == b"{}" and not claim.writable
        claim.release()
