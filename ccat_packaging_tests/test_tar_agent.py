"""The assembler on its own: exact size prediction, determinism, refusal of unsafe input."""

from __future__ import annotations

import hashlib
import os
import tarfile
from pathlib import Path

import pytest

from ccat_packaging.assembly import tar_agent
from ccat_packaging.assembly.tar_agent import AgentError


def _tree(root: Path, files: dict[str, bytes]) -> list[list[object]]:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return [[name, len(data)] for name, data in files.items()]


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
    second = _build(src, dest, members)
    assert first["checksum"] == second["checksum"]
    assert not Path(first["temp_path"]).exists()  # the second build cleared it
    assert Path(second["temp_path"]).read_bytes() == Path(second["temp_path"]).read_bytes()


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


def test_verify_catches_truncation_at_a_member_boundary(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"a.dat": os.urandom(1024), "b.dat": os.urandom(1024)})
    built = _build(src, dest, members)
    tar_agent.run_command(
        "verify", {"path": built["temp_path"], "members": members}, tar_agent.Progress()
    )
    with open(built["temp_path"], "r+b") as handle:  # cut after a's data: tar -tf still lists it
        handle.truncate(512 + 1024)
    with pytest.raises(AgentError, match="expected") as info:
        tar_agent.run_command(
            "verify", {"path": built["temp_path"], "members": members}, tar_agent.Progress()
        )
    assert info.value.kind == "verification"


def test_verify_catches_a_member_list_that_differs(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"a.dat": b"1" * 100, "b.dat": b"2" * 100})
    built = _build(src, dest, members)
    renamed = [["a.dat", 100], ["c.dat", 100]]
    with pytest.raises(AgentError, match="members differ"):
        tar_agent.run_command(
            "verify", {"path": built["temp_path"], "members": renamed}, tar_agent.Progress()
        )


def test_not_enough_space_is_refused_before_writing(tmp_path: Path, small_disk: Path) -> None:
    src = tmp_path / "src"
    members = _tree(src, {"a.dat": os.urandom(80 << 20)})
    with pytest.raises(AgentError, match="not enough space") as info:
        _build(src, small_disk, members)
    assert info.value.kind == "no_space"
    assert [p.name for p in small_disk.rglob("*") if p.is_file()] == [".pkg.tar.lock"]


def test_publish_renames_atomically_into_place(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    members = _tree(src, {"a.dat": b"abc"})
    built = _build(src, dest, members)
    out = tar_agent.run_command(
        "publish",
        {"temp_path": built["temp_path"], "dest_root": str(dest), "dest_relative": "p/pkg.tar"},
        tar_agent.Progress(),
    )
    assert out["path"] == str(dest / "p" / "pkg.tar")
    assert hashlib.sha256((dest / "p" / "pkg.tar").read_bytes()).hexdigest() == built["checksum"]
    assert sorted(p.name for p in (dest / "p").iterdir()) == [".pkg.tar.lock", "pkg.tar"]


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
    tar_agent.verify({"path": result["temp_path"], "members": members}, tar_agent.Progress())


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


def test_a_symlinked_directory_that_stays_inside_the_root_is_followed(tmp_path: Path) -> None:
    src, dest = tmp_path / "src", tmp_path / "buf"
    dest.mkdir()
    _tree(src, {"real/a.dat": b"inside"})
    (src / "alias").symlink_to(src / "real")
    result = _build(src, dest, [["alias/a.dat", 6]])
    with tarfile.open(result["temp_path"]) as archive:
        assert [(m.name, m.size) for m in archive] == [("alias/a.dat", 6)]


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
