"""The assembler on its own: exact size prediction, determinism, refusal of unsafe input."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from ccat_packaging.assembly import tar_agent
from ccat_packaging.assembly.tar_agent import AgentError
from ccat_packaging_tests.special_files import SPECIAL


def _tree(root: Path, files: dict[str, bytes]) -> list[list[object]]:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return [[name, len(data)] for name, data in files.items()]


def _verify_spec(built: dict, members: list[list[object]]) -> dict:
    return {"path": built["temp_path"], "identity": built["identity"], "members": members}


def _build(src: Path, dest: Path, members: list[list[object]], rel: str = "p/pkg.tar") -> dict:
    return tar_agent.run_command(
        "build",
        {"source_root": str(src), "members": members, "dest_root": str(dest), "dest_relative": rel},
        tar_agent.Progress(),
    )


NAMES = {
    "a.dat": b"",
    "dir/b.dat": os.urandom(511),
    "dir/sub/c.dat": os.urandom(512),
    "d" * 99 + ".x": os.urandom(513),  # 101 bytes: needs a GNU long-name header
    "e/" + "f" * 150: os.urandom(100_000),
    "g/" + "h" * 200 + "/" + "i" * 200: os.urandom(10),
}


def test_written_size_is_predicted_exactly_and_checksum_is_of_the_bytes(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, NAMES)
    result = _build(src, dest, members)
    data = Path(result["temp_path"]).read_bytes()
    assert (
        len(data)
        == result["size"]
        == tar_agent.predicted_size(
            [(str(n), int(s)) for n, s in members]  # type: ignore[call-overload]
        )
    )
    assert result["checksum"] == hashlib.sha256(data).hexdigest()
    with tarfile.open(result["temp_path"]) as archive:
        assert [(m.name, m.size) for m in archive] == [tuple(m) for m in members]
        for name, content in NAMES.items():
            extracted = archive.extractfile(name)
            assert extracted is not None and extracted.read() == content


def test_same_input_gives_same_bytes_and_replaces_stale_partials(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    members = _tree(src, {"x/1.dat": os.urandom(5000), "x/2.dat": os.urandom(70000)})
    (dest / "p").mkdir(parents=True)
    stale = dest / "p" / ".pkg.tar.partial.crashed"
    stale.write_bytes(b"half")
    first = _build(src, dest, members)
    assert not stale.exists()
    first_bytes = Path(first["temp_path"]).read_bytes()  # before the second build clears it
    second = _build(src, dest, members)
    assert first["checksum"] == second["checksum"]
    assert not Path(first["temp_path"]).exists()  # the second build cleared it
    assert Path(second["temp_path"]).read_bytes() == first_bytes
    assert hashlib.sha256(first_bytes).hexdigest() == first["checksum"]


@pytest.mark.parametrize(
    "bad", ["/etc/passwd", "../x", "a/../../x", "a//b", "./a", "a/.", "", "a\0b"]
)
def test_unsafe_relative_paths_are_refused_before_anything_is_written(
    tmp_path: Path, bad: str
) -> None:
    (tmp_path / "buf").mkdir()
    with pytest.raises(AgentError) as info:
        _build(tmp_path, tmp_path / "buf", [[bad, 1]])
    assert info.value.kind == "unsafe_path"
    assert list((tmp_path / "buf").iterdir()) == []


def test_symlinks_out_of_the_root_are_refused(tmp_path: Path) -> None:
    src, dest, outside = tmp_path / "src", tmp_path / "buf", tmp_path / "secret"
    outside.mkdir()
    (outside / "key").write_bytes(b"secret")
    src.mkdir()
    dest.mkdir()
    (src / "link.dat").symlink_to(outside / "key")
    (src / "dirlink").symlink_to(outside)
    for name in ("link.dat", "dirlink/key"):
        with pytest.raises(AgentError) as info:
            _build(src, dest, [[name, 6]])
        assert info.value.kind == "unsafe_path", name
    assert list(dest.rglob("*.tar*")) == []


@pytest.mark.parametrize("case", ["missing", "grown", "directory"])
def test_changed_or_missing_source_files_fail_and_leave_nothing(tmp_path: Path, case: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"ok.dat": b"fine", "bad.dat": b"12345"})
    if case == "missing":
        (src / "bad.dat").unlink()
    elif case == "grown":
        (src / "bad.dat").write_bytes(b"123456")
    else:
        (src / "bad.dat").unlink()
        (src / "bad.dat").mkdir()
    with pytest.raises(AgentError, match=r"bad\.dat") as info:
        _build(src, dest, members)
    assert info.value.kind == "source_file"
    assert [p.name for p in dest.rglob("*") if p.is_file() and "lock" not in p.name] == []


def run_agent_process(command: str, spec: dict, tmp_path: Path) -> dict:
    """The agent as it runs on a remote host: a process of its own, bounded in time (a file
    that blocks its open would hang it)."""
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec))
    argv = ["python3", "-I", "-S", tar_agent.__file__, command, str(spec_file)]
    done = subprocess.run(argv, capture_output=True, timeout=30, check=False)
    return dict(json.loads(done.stdout.splitlines()[-1]))


@pytest.mark.parametrize("kind", SPECIAL)
def test_special_files_fail_at_once_as_not_regular(tmp_path: Path, kind: str) -> None:
    """Nothing is opened that is not a regular file: a named pipe would block for a writer,
    a device could be acted on (the block device is a loop device nobody set up)."""
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"ok.dat": b"fine"})
    SPECIAL[kind](src / "odd.dat")
    spec = {
        "source_root": str(src),
        "members": [*members, ["odd.dat", 0]],
        "dest_root": str(dest),
        "dest_relative": "p/pkg.tar",
    }
    result = run_agent_process("build", spec, tmp_path)
    assert result["error"] == {
        "kind": "source_file",
        "message": f"source file 'odd.dat' is not a regular file but a {kind}",
    }
    with pytest.raises(AgentError, match=f"not a regular file but a {kind}"):
        tar_agent.run_command("build", spec, tar_agent.Progress())
    assert [p.name for p in dest.rglob("*") if p.is_file() and "lock" not in p.name] == []


@contextlib.contextmanager
def read_only(directory: Path) -> Iterator[None]:
    """``directory`` on a read-only bind mount of itself: EROFS, which even root gets."""
    subprocess.run(["mount", "--bind", str(directory), str(directory)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(directory)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(directory)], check=True)


def test_a_read_only_buffer_is_a_named_error_not_a_crash(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    (dest / "p").mkdir(parents=True)
    members = _tree(src, {"a.dat": b"abc"})
    with read_only(dest), pytest.raises(AgentError) as info:
        _build(src, dest, members)
    assert info.value.kind == "unwritable"
    assert "Read-only file system [EROFS]" in info.value.message
    assert str(dest / "p") in info.value.message


def test_verify_catches_truncation_at_a_member_boundary(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"a.dat": os.urandom(1024), "b.dat": os.urandom(1024)})
    built = _build(src, dest, members)
    tar_agent.run_command("verify", _verify_spec(built, members), tar_agent.Progress())
    with open(built["temp_path"], "r+b") as handle:  # cut after a's data: tar -tf still lists it
        handle.truncate(512 + 1024)
    with pytest.raises(AgentError, match="expected") as info:
        tar_agent.run_command("verify", _verify_spec(built, members), tar_agent.Progress())
    assert info.value.kind == "verification"


def test_verify_catches_a_member_list_that_differs(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"a.dat": b"1" * 100, "b.dat": b"2" * 100})
    built = _build(src, dest, members)
    renamed = [["a.dat", 100], ["c.dat", 100]]
    with pytest.raises(AgentError, match="members differ"):
        tar_agent.run_command("verify", _verify_spec(built, renamed), tar_agent.Progress())


def test_not_enough_space_is_refused_before_writing(tmp_path: Path, small_disk: Path) -> None:
    src = tmp_path / "src"
    members = _tree(src, {"a.dat": os.urandom(80 << 20)})
    with pytest.raises(AgentError, match="not enough space") as info:
        _build(src, small_disk, members)
    assert info.value.kind == "no_space"
    assert sorted(p.name for p in small_disk.rglob("*") if p.is_file()) == [
        ".pkg.tar.lock",
        "buffer.lock",
    ]


def _publish_spec(dest: Path, built: dict, rel: str = "p/pkg.tar", **options: object) -> dict:
    return {
        "temp_path": built["temp_path"],
        "identity": built["identity"],
        "dest_root": str(dest),
        "dest_relative": rel,
        "size": built["size"],
        "checksum": built["checksum"],
        **options,
    }


def _publish(dest: Path, built: dict, rel: str = "p/pkg.tar") -> dict:
    return tar_agent.run_command(
        "publish",
        _publish_spec(dest, built, rel),
        tar_agent.Progress(),
    )


def test_publish_gives_the_final_name_and_leaves_only_the_archive(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    built = _build(src, dest, _tree(src, {"a.dat": b"abc"}))
    out = _publish(dest, built)
    assert out == {"path": str(dest / "p" / "pkg.tar"), "adopted": False}
    assert hashlib.sha256((dest / "p" / "pkg.tar").read_bytes()).hexdigest() == built["checksum"]
    assert sorted(p.name for p in (dest / "p").iterdir()) == [".pkg.tar.lock", "pkg.tar"]


def test_an_identical_archive_already_published_is_adopted(tmp_path: Path) -> None:
    """The crash-recovery case: an attempt published, then died before the database knew."""
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"a.dat": os.urandom(3000)})
    _publish(dest, _build(src, dest, members))
    again = _build(src, dest, members)
    assert _publish(dest, again) == {"path": str(dest / "p" / "pkg.tar"), "adopted": True}
    assert not Path(again["temp_path"]).exists()
    # A step that published and is run again finds its temporary archive gone: same answer.
    assert _publish(dest, again)["adopted"] is True


@pytest.mark.parametrize("obstacle", ["other file", "same size, other bytes", "directory"])
def test_publish_never_replaces_what_is_not_this_package(tmp_path: Path, obstacle: str) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    built = _build(src, dest, _tree(src, {"a.dat": os.urandom(3000)}))
    final = dest / "p" / "pkg.tar"
    if obstacle == "directory":
        (final / "inside").mkdir(parents=True)
    else:
        size = built["size"] if obstacle.startswith("same size") else 10
        final.write_bytes(b"x" * size)
    before = sorted(str(p) for p in final.rglob("*")) if final.is_dir() else final.read_bytes()
    with pytest.raises(AgentError) as info:
        _publish(dest, built)
    assert info.value.kind == "exists"
    assert str(final) in info.value.message and "left untouched" in info.value.message
    after = sorted(str(p) for p in final.rglob("*")) if final.is_dir() else final.read_bytes()
    assert after == before
    assert Path(built["temp_path"]).exists()  # the caller decides: discard, or try again


def test_publish_without_its_temporary_archive_or_final_file_publishes_nothing(
    tmp_path: Path,
) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    built = _build(src, dest, _tree(src, {"a.dat": b"abc"}))
    os.unlink(built["temp_path"])
    with pytest.raises(AgentError) as info:
        _publish(dest, built)
    assert info.value.kind == "verification" and "gone" in info.value.message
    assert not (dest / "p" / "pkg.tar").exists()


def _build_checked(tmp_path: Path, data: bytes, on_disk: bytes, alg: str, filed: str) -> dict:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir(exist_ok=True)
    _tree(src, {"f.dat": on_disk})
    return tar_agent.run_command(
        "build",
        {
            "source_root": str(src),
            "members": [["f.dat", len(data)]],
            "dest_root": str(dest),
            "dest_relative": "p/pkg.tar",
            "checksums": {"f.dat": [alg, filed]},
        },
        tar_agent.Progress(),
    )


@pytest.mark.parametrize(
    ("alg", "digest"),
    [
        ("sha256", lambda d: hashlib.sha256(d).hexdigest()),
        ("md5", lambda d: hashlib.md5(d).hexdigest()),
        ("adler32", lambda d: f"{__import__('zlib').adler32(d):08x}"),
    ],
)
def test_filed_checksums_are_checked_in_the_same_pass(tmp_path: Path, alg: str, digest) -> None:
    data = os.urandom(9 << 20)  # spans several pipeline buffers
    built = _build_checked(tmp_path, data, data, alg, digest(data))
    assert hashlib.sha256(Path(built["temp_path"]).read_bytes()).hexdigest() == built["checksum"]
    altered = bytearray(data)
    altered[5 << 20] ^= 0xFF  # same size, one bit flipped in the middle
    with pytest.raises(AgentError, match=r"altered since filing") as info:
        _build_checked(tmp_path, data, bytes(altered), alg, digest(data))
    assert info.value.kind == "source_file"
    assert _leftovers(tmp_path / "buf") == []


@pytest.mark.parametrize(
    ("alg", "form"),
    [
        ("sha256", lambda hex_: f"sha256:{hex_}"),
        ("SHA256", lambda hex_: hex_.upper()),
        ("sha256", lambda hex_: f"SHA256:{hex_.upper()}"),
        ("sha256", lambda hex_: f" {hex_}\n"),
    ],
)
def test_filed_checksums_in_every_form_of_the_operations_database_are_understood(
    tmp_path: Path, alg: str, form
) -> None:
    data = os.urandom(3000)
    filed = form(hashlib.sha256(data).hexdigest())
    built = _build_checked(tmp_path, data, data, alg, filed)
    assert Path(built["temp_path"]).exists()
    altered = b"X" + data[1:]
    with pytest.raises(AgentError, match="altered since filing"):
        _build_checked(tmp_path, data, altered, alg, filed)


@pytest.mark.parametrize(
    "filed",
    [
        "md5:" + "0" * 64,  # a prefix naming another algorithm
        "0" * 63,  # too short
        "z" * 64,  # not hex
        "",
        "sha256:",
    ],
)
def test_a_filed_checksum_in_an_unknown_form_is_a_filing_error_not_an_alteration(
    tmp_path: Path, filed: str
) -> None:
    with pytest.raises(AgentError) as info:
        _build_checked(tmp_path, b"abc", b"abc", "sha256", filed)
    assert info.value.kind == "source_file"
    assert "'f.dat' is not one" in info.value.message
    assert "altered" not in info.value.message
    assert _leftovers(tmp_path / "buf") == []


def test_an_unknown_checksum_algorithm_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="unknown algorithm") as info:
        _build_checked(tmp_path, b"abc", b"abc", "crc99", "00")
    assert info.value.kind == "config"


def test_a_file_smaller_than_filed_is_not_ready_rather_than_changed(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    _tree(src, {"growing.dat": b"x" * 100})
    with pytest.raises(AgentError, match="still being written") as info:
        _build(src, dest, [["growing.dat", 1000]])
    assert info.value.kind == "not_ready"


def _leftovers(root: Path) -> list[str]:
    return [p.name for p in root.rglob("*") if p.is_file() and not p.name.endswith(".lock")]


def _open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_read_ahead_and_directory_reuse_keep_the_archive_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small limits, so that files are opened ahead across directories, directories are
    evicted and opened again, and members span several cache steps and buffers."""
    monkeypatch.setattr(tar_agent, "READ_AHEAD_FILES", 4)
    monkeypatch.setattr(tar_agent, "READ_AHEAD_BYTES", 3000)
    monkeypatch.setattr(tar_agent, "DIRECTORY_FDS", 3)
    monkeypatch.setattr(tar_agent, "CACHE_STEP", 1 << 16)
    monkeypatch.setattr(tar_agent, "CACHE_LAG", 1 << 17)
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    contents = {f"d{d:02d}/{f}.dat": os.urandom(100 + 977 * d) for f in "ab" for d in range(9)}
    contents["big/x.dat"] = os.urandom(5 * (1 << 16) + 123)
    members = _tree(src, contents)  # a's of every directory, then b's: directories come back
    filed = {name: ["sha256", hashlib.sha256(data).hexdigest()] for name, data in contents.items()}
    before = _open_descriptors()
    result = tar_agent.build(
        {
            "source_root": str(src),
            "members": members,
            "dest_root": str(dest),
            "dest_relative": "p/pkg.tar",
            "checksums": filed,
        },
        tar_agent.Progress(),
    )
    assert _open_descriptors() == before
    data = Path(result["temp_path"]).read_bytes()
    assert len(data) == tar_agent.predicted_size(
        [(str(name), len(contents[str(name)])) for name, _ in members]
    )
    assert result["checksum"] == hashlib.sha256(data).hexdigest()
    with tarfile.open(result["temp_path"]) as archive:
        assert [m.name for m in archive] == list(contents)
        for name, content in contents.items():
            extracted = archive.extractfile(name)
            assert extracted is not None and extracted.read() == content
    tar_agent.run_command("verify", _verify_spec(dict(result), members), tar_agent.Progress())


def test_a_failure_with_files_opened_ahead_closes_them_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {f"d{i % 3}/f{i:02d}.dat": os.urandom(1000) for i in range(40)})
    copy = tar_agent._copy_member
    copied: list[str] = []

    def failing(pipe, relative, fd, st, check):
        if len(copied) == 5:
            raise AgentError("source_file", f"source file {relative!r} vanished")
        copied.append(relative)
        copy(pipe, relative, fd, st, check)

    monkeypatch.setattr(tar_agent, "_copy_member", failing)
    before = _open_descriptors()
    with pytest.raises(AgentError, match="vanished"):
        _build(src, dest, members)
    assert _open_descriptors() == before
    assert _leftovers(dest) == []


def test_a_symlinked_directory_is_refused_even_where_it_stays_inside_the_root(
    tmp_path: Path,
) -> None:
    """Source paths follow no symlink at all: one that points inside the root now can point
    anywhere a moment later, and the instruments write real directories."""
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    _tree(src, {"real/a.dat": b"inside"})
    (src / "alias").symlink_to(src / "real")
    with pytest.raises(AgentError) as info:
        _build(src, dest, [["alias/a.dat", 6]])
    assert info.value.kind == "unsafe_path"
    assert f"lies under a symlink, {src / 'alias'}" in info.value.message
    assert _leftovers(dest) == []


def test_a_source_directory_swapped_for_a_symlink_at_its_open_is_not_followed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of a checked path: every time the agent opens the member's directory, an
    attacker has just swapped it for a symlink to a file of the same name and size outside the
    root, and swaps it back right after. No filed checksum: its size alone matches."""
    src, dest, outside = tmp_path / "src", tmp_path / "buf", tmp_path / "outside"
    dest.mkdir()
    members = _tree(src, {"d/f.dat": b"inside"})
    _tree(outside, {"f.dat": b"secret"})
    real_open, swaps = os.open, []

    def swapping_open(path, flags, *args, **kwargs):
        if os.fspath(path) not in (str(src / "d"), "d"):
            return real_open(path, flags, *args, **kwargs)
        os.rename(src / "d", tmp_path / "d.real")
        (src / "d").symlink_to(outside)
        swaps.append(path)
        try:
            return real_open(path, flags, *args, **kwargs)
        finally:
            (src / "d").unlink()
            os.rename(tmp_path / "d.real", src / "d")

    monkeypatch.setattr(os, "open", swapping_open)
    with pytest.raises(AgentError) as info:
        _build(src, dest, members)
    monkeypatch.undo()
    assert swaps, "the agent never opened the directory: nothing was swapped"
    assert info.value.kind == "unsafe_path", info.value.message
    assert f"lies under a symlink, {src / 'd'}" in info.value.message
    assert _leftovers(dest) == []


# --- concurrent assemblies into one buffer: real processes, a 64 MiB tmpfs ---------------------

MiB = 1 << 20
HALF = 20 * MiB  # each package has two members of this size: two packages do not fit in 64 MiB


def _package_spec(src: Path, dest: Path, name: str) -> tar_agent.BuildSpec:
    members = _tree(src, {f"{name}{i}.dat": os.urandom(MiB) * (HALF // MiB) for i in (1, 2)})
    return tar_agent.BuildSpec(
        source_root=str(src), members=members, dest_root=str(dest), dest_relative=f"p/{name}.tar"
    )


class _Writer:
    """``build`` or ``receive`` of one package in an agent process of its own; ``held``, it
    stops after its first member (``held_writer``) until ``go``."""

    def __init__(
        self, command: str, spec: tar_agent.BuildSpec, tmp_path: Path, held: bool = False
    ) -> None:
        name = Path(spec["dest_relative"]).stem
        self.hold = tmp_path / f"hold_{name}"
        self.hold.mkdir()
        self.command = command
        self.stream = b""
        line: dict[str, object] = dict(spec)
        if command == "receive":  # the archive as ``send`` writes it on the source's host
            with open(tmp_path / f"{name}.stream", "w+b") as handle:
                sent = tar_agent.send(spec, handle.fileno(), tar_agent.Progress())
                handle.seek(0)
                self.stream = handle.read() + f"{sent['checksum']}\n".encode()
            line = {"dest_root": spec["dest_root"], "dest_relative": spec["dest_relative"]}
            line["size"] = sent["size"]
        spec_file = tmp_path / f"{name}.json"
        spec_file.write_text(json.dumps(line))
        run = ["-m", "ccat_packaging_tests.held_writer", str(self.hold), "agent"] if held else []
        agent = [] if held else ["-I", "-S", tar_agent.__file__]
        spec_arg = "-" if command == "receive" else str(spec_file)
        self.process = subprocess.Popen(
            [sys.executable, *run, *agent, command, spec_arg],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        if command == "receive":
            assert self.process.stdin is not None
            self.process.stdin.write(spec_file.read_bytes() + b"\n")
            self.process.stdin.flush()
            if held:  # the first half now, the rest on ``go``
                self.process.stdin.write(self.stream[:HALF])
                self.process.stdin.flush()
                self.stream = self.stream[HALF:]

    def writing(self, buffer: Path) -> Callable[[], bool]:
        """Whether the held writer has written its first half into ``buffer``."""
        if self.command == "build":
            return (self.hold / "held").exists
        name = self.hold.name.removeprefix("hold_")
        return lambda: (
            sum(p.stat().st_size for p in buffer.rglob(f".{name}.tar.partial.*")) >= (HALF - MiB)
        )

    def result(self) -> tuple[int, dict]:
        """Let it go on, and its exit code and result line."""
        (self.hold / "go").touch()
        out, err = self.process.communicate(self.stream, timeout=120)
        assert out, err.decode()
        return self.process.returncode, json.loads(out.decode().splitlines()[-1])


def _until(condition: Callable[[], bool], what: str, writer: _Writer, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert writer.process.poll() is None, f"{what}: it ended: {writer.process.communicate()}"
        assert time.monotonic() < deadline, f"{what}: not within {seconds} s"
        time.sleep(0.01)


def _reservations(buffer: Path) -> list[str]:
    return sorted(p.name for p in (buffer / tar_agent.RESERVATIONS).glob("*.json"))


@pytest.mark.parametrize(
    ("first", "second"), [("build", "build"), ("build", "receive"), ("receive", "build")]
)
def test_of_two_packages_that_do_not_fit_together_only_one_starts(
    tmp_path: Path, small_disk: Path, first: str, second: str
) -> None:
    """The second is refused before it writes anything, naming the package that holds the
    space; the first is never short of space mid-write. A ``receive`` (the stream of another
    host) reserves and respects reservations exactly like a ``build``."""
    a = _package_spec(tmp_path / "src", small_disk, "a")
    b = _package_spec(tmp_path / "src", small_disk, "b")
    writing = _Writer(first, a, tmp_path, held=True)
    _until(writing.writing(small_disk), "the first package never started writing", writing)
    assert len(_reservations(small_disk)) == 1

    code, refused = _Writer(second, b, tmp_path).result()

    assert code == 3 and refused["error"]["kind"] == "reserved", refused
    message = refused["error"]["message"]
    assert "reserved by p/a.tar (" in message and "bytes to go" in message, message
    assert list(small_disk.rglob(".b.tar.partial.*")) == []
    assert len(_reservations(small_disk)) == 1  # the refused one left none
    code, done = writing.result()
    assert code == 0, done
    data = Path(done["ok"]["temp_path"]).read_bytes()
    assert (
        len(data)
        == done["ok"]["size"]
        == tar_agent.predicted_size([(str(n), int(str(s))) for n, s in a["members"]])
    )
    assert hashlib.sha256(data).hexdigest() == done["ok"]["checksum"]
    assert _reservations(small_disk) == []


def test_the_reservation_of_a_killed_writer_does_not_block_and_is_cleared(
    tmp_path: Path, small_disk: Path
) -> None:
    a = _package_spec(tmp_path / "src", small_disk, "a")
    b = _package_spec(tmp_path / "src", small_disk, "b")
    killed = _Writer("build", a, tmp_path, held=True)
    _until(killed.writing(small_disk), "the first package never started writing", killed)
    killed.process.send_signal(signal.SIGKILL)
    killed.process.wait(timeout=60)
    [partial] = small_disk.rglob(".a.tar.partial.*")
    assert len(_reservations(small_disk)) == 1  # left behind, its lock gone with its process

    code, built = _Writer("build", b, tmp_path).result()

    assert code == 0, built
    assert Path(built["ok"]["temp_path"]).stat().st_size == built["ok"]["size"]
    assert not partial.exists()  # the dead writer's half-written file went with its reservation
    assert _reservations(small_disk) == []


def test_verify_reports_a_damaged_first_header_as_a_verification_error(tmp_path: Path) -> None:
    """tarfile refuses such an archive outright; the agent must still answer with its own
    error kind, or the caller cannot tell damage from a bug (and a remote agent would die
    without a result line)."""
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"a.dat": os.urandom(700), "b.dat": os.urandom(300)})
    built = _build(src, dest, members)
    with open(built["temp_path"], "r+b") as handle:
        handle.write(b"A")  # the first byte of the first member's name
    with pytest.raises(AgentError, match="not a valid archive") as info:
        tar_agent.run_command("verify", _verify_spec(built, members), tar_agent.Progress())
    assert info.value.kind == "verification"


def _receive(dest: Path, archive: bytes, checksum_line: bytes) -> dict:
    arriving = dest.parent / "stream"
    arriving.write_bytes(archive + checksum_line)
    spec = tar_agent.ReceiveSpec(dest_root=str(dest), dest_relative="p/pkg.tar", size=len(archive))
    with open(arriving, "rb") as stream:
        return dict(tar_agent.receive(spec, stream, tar_agent.Progress()))


def _sent_archive(tmp_path: Path) -> tuple[bytes, str]:
    """An archive as ``send`` writes it, and its checksum."""
    members = _tree(tmp_path / "src", {"a.dat": os.urandom(3 << 20), "b.dat": os.urandom(5)})
    read_end, write_end = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(
        target=lambda: chunks.extend(iter(lambda: os.read(read_end, 1 << 16), b""))
    )
    reader.start()
    try:
        spec = {"source_root": str(tmp_path / "src"), "members": members}
        sent = tar_agent.send(spec, write_end, tar_agent.Progress())  # type: ignore[arg-type]
    finally:
        os.close(write_end)
        reader.join()
        os.close(read_end)
    return b"".join(chunks), sent["checksum"]


@pytest.mark.parametrize("case", ["a byte flipped in transit", "a wrong checksum", "no checksum"])
def test_receive_keeps_nothing_unless_the_bytes_have_the_senders_checksum(
    tmp_path: Path, case: str
) -> None:
    data, checksum = _sent_archive(tmp_path)
    dest = tmp_path / "buf"
    dest.mkdir()
    good = _receive(dest, data, f"{checksum}\n".encode())
    assert Path(good["temp_path"]).read_bytes() == data and good["checksum"] == checksum
    flipped = bytearray(data)
    flipped[2 << 20] ^= 0x01  # inside a's data, where verify would never look
    arriving, line = {
        "a byte flipped in transit": (bytes(flipped), f"{checksum}\n"),
        "a wrong checksum": (data, f"{hashlib.sha256(b'other').hexdigest()}\n"),
        "no checksum": (data, ""),
    }[case]
    with pytest.raises(AgentError, match="the sender's checksum was") as info:
        _receive(dest, arriving, line.encode())
    assert info.value.kind == "verification"
    assert _leftovers(dest) == []  # neither this attempt's file nor the earlier good one


# fsync is what makes an archive survive a crash of the machine, which a test cannot cause:
# the agent runs here as the process it is on a remote host, under strace, and the test reads
# the order of its system calls on the archive and its directory.
STRACED = "trace=/^(f(data)?sync|(rename|link)(at2?)?|p?writev?(64)?|close)$"
AGENT = Path(tar_agent.__file__)


@dataclass(frozen=True)
class Syscall:
    name: str
    target: str  # the path behind the descriptor, or the new name of a rename or link
    ok: bool


def _traced(
    tmp_path: Path, command: str, spec: dict, stdin: bytes = b"", trace: str = STRACED
) -> list[Syscall]:
    """Run ``python3 -I -S tar_agent.py COMMAND SPEC`` under strace; its calls in order."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.fail("strace is missing: run scripts/test-setup.sh (installs it)")
    spec_file, log = tmp_path / f"{command}.json", tmp_path / f"{command}.strace"
    spec_file.write_text(json.dumps(spec))
    command_line = [sys.executable, "-I", "-S", str(AGENT), command, str(spec_file)]
    done = subprocess.run(
        [strace, "-f", "-qq", "-y", "-s", "0", "-o", str(log), "-e", trace, *command_line],
        input=stdin,
        capture_output=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    calls = []
    for line in log.read_text().splitlines():
        found = re.match(r"\d+\s+(\w+)\((.*)\)\s+= (-?\d+)", line)
        if found is None:
            continue  # an unfinished or resumed call, a signal
        name, args, code = found.groups()
        if name.startswith(("rename", "link", "mkdir")):  # the new name, in its directory
            directory, new_name = re.findall(r'(?:\d+<([^>]*)>, )?"([^"]*)"', args)[-1]
            target = os.path.join(directory, new_name)
        else:
            target = re.match(r"\d+<(.*?)>", args).group(1) if "<" in args else ""  # type: ignore[union-attr]
        calls.append(Syscall(name, target, code != "-1"))
    return calls


@pytest.mark.parametrize("command", ["build", "receive"])
def test_an_archive_is_fsynced_after_its_last_byte(tmp_path: Path, command: str) -> None:
    dest = tmp_path / "buf"
    dest.mkdir()
    if command == "build":
        members = _tree(tmp_path / "src", {"a.dat": os.urandom(3 << 20), "b.dat": b"x"})
        spec: dict = {
            "source_root": str(tmp_path / "src"),
            "members": members,
            "dest_root": str(dest),
            "dest_relative": "p/pkg.tar",
        }
        stdin = b""
    else:
        data, checksum = _sent_archive(tmp_path)
        spec = {"dest_root": str(dest), "dest_relative": "p/pkg.tar", "size": len(data)}
        stdin = data + f"{checksum}\n".encode()
    calls = _traced(tmp_path, command, spec, stdin)
    [temp] = [str(p) for p in dest.rglob(".pkg.tar.partial.*")]
    on_temp = [c for c in calls if c.target == temp]
    writes = [i for i, c in enumerate(on_temp) if c.name.startswith(("write", "pwrite"))]
    syncs = [i for i, c in enumerate(on_temp) if c.name in ("fsync", "fdatasync") and c.ok]
    closes = [i for i, c in enumerate(on_temp) if c.name == "close"]
    assert writes, f"strace saw no write to {temp}: {calls}"
    assert syncs and writes[-1] < syncs[-1] < closes[-1], on_temp


def test_publish_fsyncs_the_directory_after_giving_the_final_name(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    built = _build(src, dest, _tree(src, {"a.dat": b"abc"}))
    calls = _traced(tmp_path, "publish", _publish_spec(dest, built))
    final = dest / "p" / "pkg.tar"
    assert final.exists()
    [named] = [i for i, c in enumerate(calls) if c.name.startswith("link") and c.ok]
    assert calls[named].target == str(final)
    assert any(
        c.name == "fsync" and c.ok and c.target == str(final.parent) for c in calls[named:]
    ), calls


def test_position_names_the_file_a_byte_of_the_archive_belongs_to() -> None:
    """How a stall names the file it stopped at: the archive's layout is exactly predictable."""
    long_name = "b" * 101  # a GNU long-name header: 3 blocks
    members = [("a.dat", 100), ("empty.dat", 0), (long_name, 600)]
    assert tar_agent.position(members, 0) == "the header of 'a.dat'"
    assert tar_agent.position(members, 512 + 99) == "'a.dat' at its byte 99 of 100"
    assert tar_agent.position(members, 1023) == "'a.dat' at its byte 100 of 100"  # its padding
    assert tar_agent.position(members, 1024) == "the header of 'empty.dat'"
    assert tar_agent.position(members, 1536 + 3 * 512 - 1) == f"the header of {long_name!r}"
    assert tar_agent.position(members, 3072) == f"{long_name!r} at its byte 0 of 600"
    end = tar_agent.position(members, 3072 + 1024)
    assert end == "the end of the archive, after its last file"


# --- the temporary archive between build and publish, and paths that are not what they seem -----


def _forgery(tmp_path: Path, members: list[list[object]]) -> Path:
    """An archive with the package's size and member headers (all that verify reads) but other
    bytes, built elsewhere on the same file system."""
    forged_src, elsewhere = tmp_path / "forged_src", tmp_path / "elsewhere"
    elsewhere.mkdir()
    _tree(forged_src, {str(name): os.urandom(int(str(size))) for name, size in members})
    return Path(_build(forged_src, elsewhere, members)["temp_path"])


@pytest.mark.parametrize("attack", ["swapped", "hard-linked", "modified in place"])
def test_only_the_file_the_build_hashed_is_verified_and_published(
    tmp_path: Path, attack: str
) -> None:
    """Someone who can write the buffer's directory replaces the temporary archive between
    build and publish (the steps are separate commands), or alters it where verify does not
    look: neither verify nor publish take it, and nothing gets the final name, whose checksum
    the database would record as the build's."""
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"a.dat": os.urandom(3000), "b.dat": os.urandom(100)})
    built = _build(src, dest, members)
    temp, planted = Path(built["temp_path"]), dest / "p" / "planted"
    if attack == "swapped":
        shutil.copyfile(_forgery(tmp_path, members), planted)
        os.replace(planted, temp)
    elif attack == "hard-linked":
        os.link(_forgery(tmp_path, members), planted)
        os.replace(planted, temp)
    else:
        time.sleep(0.05)  # past the file system's timestamp granularity (see the README)
        with open(temp, "r+b") as handle:
            handle.seek(512 + 1000)  # inside a.dat's data, where verify never looks
            handle.write(b"X")
    assert temp.stat().st_size == built["size"]
    with tarfile.open(temp) as archive:  # what verify checked before: all still fine
        assert [[m.name, m.size] for m in archive] == members
    assert hashlib.sha256(temp.read_bytes()).hexdigest() != built["checksum"]
    for command, spec in [
        ("verify", _verify_spec(built, members)),
        ("publish", _publish_spec(dest, built)),
    ]:
        with pytest.raises(AgentError, match="is not the file the build wrote") as info:
            tar_agent.run_command(command, spec, tar_agent.Progress())
        assert info.value.kind == "verification", command
    assert not (dest / "p" / "pkg.tar").exists()
    # Discarded is only the build's own file, altered or not; a replacement is not ours.
    discard = {**_publish_spec(dest, built), "dest_root": str(dest)}
    removed = tar_agent.run_command("discard", discard, tar_agent.Progress())["removed"]
    assert removed is (attack == "modified in place") and temp.exists() is not removed


def test_a_file_swapped_in_while_publish_links_is_not_what_gets_the_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The swap at the last moment, after publish checked the file and just before its
    link(2): the link is made from the checked file's descriptor, not from its name, and the
    kernel links no file that lost its last name, so nothing is published."""
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"a.dat": os.urandom(3000)})
    built = _build(src, dest, members)
    forged, real_link = _forgery(tmp_path, members), os.link

    def swap_then_link(*args, **kwargs):
        os.replace(forged, built["temp_path"])
        return real_link(*args, **kwargs)

    monkeypatch.setattr(os, "link", swap_then_link)
    with pytest.raises(AgentError, match="replaced or removed while being published") as info:
        _publish(dest, built)
    monkeypatch.undo()
    assert info.value.kind == "verification"
    assert not (dest / "p" / "pkg.tar").exists()


def test_published_archives_get_the_umask_s_mode_or_the_configured_one(tmp_path: Path) -> None:
    """Not 0644 whatever the umask: the temporary archive is 0600 until it is named, then
    0666 less the umask of the agent's process, or the mode the spec asks for."""
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"a.dat": b"abc"})
    old = os.umask(0o027)
    try:
        built = _build(src, dest, members)
        assert stat.S_IMODE(os.stat(built["temp_path"]).st_mode) == 0o600
        _publish(dest, built)
        configured = _build(src, dest, members, rel="q/pkg.tar")
        tar_agent.run_command(
            "publish",
            _publish_spec(dest, configured, "q/pkg.tar", mode=0o444),
            tar_agent.Progress(),
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE((dest / "p" / "pkg.tar").stat().st_mode) == 0o640
    assert stat.S_IMODE((dest / "q" / "pkg.tar").stat().st_mode) == 0o444


def test_new_directories_under_the_buffer_are_fsynced_into_their_parents(
    tmp_path: Path,
) -> None:
    dest = tmp_path / "buf"
    dest.mkdir()
    members = _tree(tmp_path / "src", {"a.dat": b"abc"})
    spec = {
        "source_root": str(tmp_path / "src"),
        "members": members,
        "dest_root": str(dest),
        "dest_relative": "new/sub/pkg.tar",
    }
    calls = _traced(tmp_path, "build", spec, trace="trace=/^(mkdir(at)?|f(data)?sync)$")
    for made in (dest / "new", dest / "new" / "sub", dest / tar_agent.RESERVATIONS):
        [i] = [
            i
            for i, c in enumerate(calls)
            if c.name.startswith("mkdir") and c.ok and c.target == str(made)
        ]
        assert any(
            c.name == "fsync" and c.ok and c.target == str(made.parent) for c in calls[i:]
        ), (made, calls)


def test_a_symlinked_lock_is_refused_and_its_target_never_created(tmp_path: Path) -> None:
    src, dest, victim = tmp_path / "src", tmp_path / "buf", tmp_path / "victim"
    (dest / "p").mkdir(parents=True)
    (dest / "p" / ".pkg.tar.lock").symlink_to(victim)
    with pytest.raises(AgentError) as info:
        _build(src, dest, _tree(src, {"a.dat": b"abc"}))
    assert info.value.kind == "unsafe_path"
    assert f"the lock {dest / 'p' / '.pkg.tar.lock'} is a symlink" in info.value.message
    assert not victim.exists() and _leftovers(dest) == []


NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "/usr/bin/python3"]
HOLD_LOCK = """
import fcntl, os, sys
try:
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    print("held", flush=True)
except OSError as exc:
    print("refused", exc.errno, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def open_buffer() -> Iterator[Path]:
    """A buffer any user can reach (pytest's own directories are 0700)."""
    base = Path(tempfile.mkdtemp(prefix="ccat-buffer-"))
    base.chmod(0o755)
    try:
        yield base / "buf"
    finally:
        shutil.rmtree(base)


def test_another_user_cannot_hold_a_package_s_lock(tmp_path: Path, open_buffer: Path) -> None:
    """A process running as ``nobody`` tries to lock the package's lock file (made by an
    earlier build) to fail every build of the package as busy: it cannot even open it."""
    src, dest = tmp_path / "src", open_buffer
    dest.mkdir()
    members = _tree(src, {"a.dat": b"abc"})
    _build(src, dest, members)
    lock = dest / "p" / ".pkg.tar.lock"
    holder = subprocess.Popen(
        [*NOBODY, "-c", HOLD_LOCK, str(lock)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        attempt = holder.stdout.readline()
        assert attempt == f"refused {errno.EACCES}\n", attempt
        assert Path(_build(src, dest, members)["temp_path"]).exists()
    finally:
        holder.communicate("", timeout=30)
    assert stat.S_IMODE(lock.stat().st_mode) == 0o600


def test_a_lock_another_user_owns_is_refused(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    lock = dest / "p" / ".pkg.tar.lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    os.chown(lock, 65534, 65534)  # planted by nobody, who can hold it whenever they like
    with pytest.raises(AgentError) as info:
        _build(src, dest, _tree(src, {"a.dat": b"abc"}))
    assert info.value.kind == "unsafe_path"
    assert f"the lock {lock} is not a file of ours (owner uid 65534" in info.value.message
    assert _leftovers(dest) == []


@pytest.mark.parametrize("step", ["build", "publish"])
def test_a_symlinked_destination_directory_is_refused(tmp_path: Path, step: str) -> None:
    """An archive never lands outside the buffer through a symlink below its root, whether
    the symlink is there when the build starts or swapped in before publish."""
    src, dest, outside = tmp_path / "src", tmp_path / "buf", tmp_path / "outside"
    dest.mkdir()
    members = _tree(src, {"a.dat": b"abc"})
    if step == "build":
        outside.mkdir()
        (dest / "p").symlink_to(outside)
        run = lambda: _build(src, dest, members)  # noqa: E731
    else:
        built = _build(src, dest, members)
        os.rename(dest / "p", outside)
        (dest / "p").symlink_to(outside)
        run = lambda: _publish(dest, built)  # noqa: E731
    with pytest.raises(AgentError) as info:
        run()
    assert info.value.kind == "unsafe_path"
    assert f"{dest / 'p'} is a symlink, which is never followed" in info.value.message
    assert not (outside / "pkg.tar").exists()
    if step == "build":
        assert list(outside.iterdir()) == []
    else:  # nor is the temporary archive reached through it to be discarded
        discard = {**_publish_spec(dest, built), "dest_root": str(dest)}
        with pytest.raises(AgentError, match="is a symlink, which is never followed"):
            tar_agent.run_command("discard", discard, tar_agent.Progress())
        assert (outside / Path(built["temp_path"]).name).exists()


def test_free_space_is_the_buffer_file_systems_as_statvfs_reports_it(
    tmp_path: Path, small_disk: Path
) -> None:
    """In-process and as a process of its own (as on a remote host), on a file system whose
    size is known; a missing root is an error naming it."""
    for result in (
        tar_agent.run_command("free_space", {"root": str(small_disk)}, tar_agent.Progress()),
        run_agent_process("free_space", {"root": str(small_disk)}, tmp_path)["ok"],
    ):
        vfs = os.statvfs(small_disk)
        assert result == {"free": vfs.f_bavail * vfs.f_frsize, "total": vfs.f_blocks * vfs.f_frsize}
        assert 0 < result["free"] <= result["total"] == 64 << 20
    failed = run_agent_process("free_space", {"root": str(tmp_path / "gone")}, tmp_path)
    assert failed["error"] == {
        "kind": "io",
        "message": f"free_space: No such file or directory [ENOENT] ({tmp_path / 'gone'})",
    }
