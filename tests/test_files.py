"""sscd_triton.files: atomic writes leave the old file or the whole new one, never a part or a
temporary file; check_writable refuses outputs before any work, in one sentence."""
from __future__ import annotations

import os

import pytest

from sscd_triton import files


def _names(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.mark.parametrize("data, written", [
    (b"\x00bytes", b"\x00bytes"), ("text \u00e9", "text \u00e9".encode()),
    (lambda f: f.write(b"by a writer"), b"by a writer")])
def test_write_atomic_writes_every_kind(tmp_path, data, written):
    path = tmp_path / "out.bin"
    assert files.write_atomic(str(path), data) == str(path)
    assert path.read_bytes() == written and _names(tmp_path) == ["out.bin"]


def test_write_atomic_durable(tmp_path):
    path = tmp_path / "d.json"
    files.write_atomic(str(path), "{}", durable=True)
    assert path.read_text() == "{}" and _names(tmp_path) == ["d.json"]


def test_failing_writer_leaves_no_temporary_file(tmp_path):
    def writer(f):
        f.write(b"half of it")
        raise RuntimeError("disk on fire")
    with pytest.raises(RuntimeError, match="disk on fire"):
        files.write_atomic(str(tmp_path / "new.plan"), writer)
    assert _names(tmp_path) == []  # neither the output nor its temporary file


def test_existing_file_is_untouched_when_the_writer_raises(tmp_path):
    path = tmp_path / "sscd.onnx"
    path.write_bytes(b"the old, complete file")
    before = os.stat(path)

    def writer(f):
        f.write(b"x" * 1000)
        raise KeyboardInterrupt  # not only Exception: an interrupted export too
    with pytest.raises(KeyboardInterrupt):
        files.write_atomic(str(path), writer)
    assert path.read_bytes() == b"the old, complete file"
    assert os.stat(path).st_ino == before.st_ino and _names(tmp_path) == ["sscd.onnx"]


def test_replacing_a_file_never_shows_a_part(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    seen = []

    def writer(f):
        f.write(b"new, ")
        seen.append(path.read_text())  # mid-write, a reader still sees the old file
        f.write(b"whole")
    files.write_atomic(str(path), writer)
    assert seen == ["old"] and path.read_text() == "new, whole"


def test_copy_atomic(tmp_path):
    src, dest = tmp_path / "a.onnx", tmp_path / "sub" / "b.onnx"
    src.write_bytes(os.urandom(70_000))
    dest.parent.mkdir()
    files.copy_atomic(str(src), str(dest))
    assert dest.read_bytes() == src.read_bytes() and _names(dest.parent) == ["b.onnx"]


def test_write_into_a_missing_folder_fails_and_leaves_nothing(tmp_path):
    with pytest.raises(FileNotFoundError):
        files.write_atomic(str(tmp_path / "nodir" / "x"), b"data")
    assert _names(tmp_path) == []


def test_check_writable_accepts_new_and_existing_files(tmp_path):
    files.check_writable(str(tmp_path / "new.plan"), "--output")
    (tmp_path / "old.plan").write_bytes(b"")
    files.check_writable(str(tmp_path / "old.plan"), "--output")


def test_check_writable_folder(tmp_path):
    with pytest.raises(files.OutputError) as e:
        files.check_writable(str(tmp_path), "--output", "sscd.plan")
    assert str(e.value) == (f"--output {tmp_path} is a directory; give a file name such as "
                            f"{tmp_path / 'sscd.plan'}")
    with pytest.raises(files.OutputError) as e:  # no flag, no example: the path alone
        files.check_writable(str(tmp_path))
    assert str(e.value) == f"{tmp_path} is a directory"


def test_check_writable_missing_folder(tmp_path):
    path = tmp_path / "no" / "such" / "m.onnx"
    with pytest.raises(files.OutputError) as e:
        files.check_writable(str(path), "--output")
    assert str(e.value) == f"--output {path}: directory {path.parent} does not exist"
    assert not (tmp_path / "no").exists()


def _read_only(tmp_path, monkeypatch) -> str:
    """A read-only folder holding old.plan; os.access answers as for an unprivileged user
    (root may write anywhere, and tests may run as root)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    (folder / "old.plan").write_bytes(b"")
    folder.chmod(0o555)
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: (
        False if mode & os.W_OK and os.fspath(p).startswith(str(folder)) else access(p, mode)))
    return str(folder)


def test_check_writable_read_only_folder(tmp_path, monkeypatch):
    folder = _read_only(tmp_path, monkeypatch)
    try:
        for name in ("new.plan", "old.plan"):
            path = os.path.join(folder, name)
            with pytest.raises(files.OutputError) as e:
                files.check_writable(path, "--timing-cache")
            assert str(e.value) == f"--timing-cache {path}: not writable"
    finally:
        os.chmod(folder, 0o755)


def test_check_writable_read_only_file(tmp_path, monkeypatch):
    path = tmp_path / "ro.plan"
    path.write_bytes(b"")
    access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: (
        False if mode & os.W_OK and os.fspath(p) == str(path) else access(p, mode)))
    with pytest.raises(files.OutputError) as e:
        files.check_writable(str(path))
    assert str(e.value) == f"{path}: not writable"
