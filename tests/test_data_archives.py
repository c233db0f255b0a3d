"""Safe archive reading: unsafe members refused, damaged archives named in the error."""

import gzip
import io
import tarfile
import zipfile

import pytest

from isomax_jax.data.archives import ArchiveError, iter_archive, read_gzip


def _zip(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            z.writestr(name, data)
    return path


def _tar(path, members, links=()):
    with tarfile.open(path, "w:gz") as t:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        for name, target, kind in links:
            info = tarfile.TarInfo(name)
            info.type = kind
            info.linkname = target
            t.addfile(info)
    return path


def test_reads_matching_members_sorted(tmp_path):
    path = _zip(tmp_path / "a.zip", [("d/b.png", b"2"), ("d/a.PNG", b"1"), ("d/c.txt", b"x")])
    assert list(iter_archive(path, suffixes=(".png",))) == [("d/a.PNG", b"1"), ("d/b.png", b"2")]
    tar = _tar(tmp_path / "a.tar.gz", [("x/1.jpg", b"a"), ("y/2.jpg", b"b"), ("x/3.txt", b"c")])
    assert list(iter_archive(tar, suffixes=(".jpg",), prefix="x/")) == [("x/1.jpg", b"a")]


@pytest.mark.parametrize("bad", ["../evil.png", "/abs/evil.png", "d/../../evil.png", "C:/e.png"])
def test_zip_unsafe_names_refused(tmp_path, bad):
    path = _zip(tmp_path / "bad.zip", [("ok/a.png", b"1"), (bad, b"2")])
    with pytest.raises(ArchiveError, match="refusing member"):
        list(iter_archive(path, suffixes=(".png",)))


@pytest.mark.parametrize("bad", ["../evil.jpg", "/etc/evil.jpg", "a/../../evil.jpg"])
def test_tar_unsafe_names_refused_before_anything_is_returned(tmp_path, bad):
    path = _tar(tmp_path / "bad.tar.gz", [("ok/a.jpg", b"1"), (bad, b"2")])
    it = iter_archive(path, suffixes=(".jpg",))
    with pytest.raises(ArchiveError, match="refusing member"):
        next(it)  # the good first member is not returned either


@pytest.mark.parametrize(
    "target,kind",
    [
        ("../../etc/passwd", tarfile.SYMTYPE),
        ("/etc/passwd", tarfile.SYMTYPE),
        ("../outside", tarfile.LNKTYPE),
    ],
)
def test_tar_links_pointing_outside_refused(tmp_path, target, kind):
    path = _tar(tmp_path / "link.tar.gz", [("d/a.jpg", b"1")], links=[("d/l.jpg", target, kind)])
    with pytest.raises(ArchiveError, match="refusing link"):
        list(iter_archive(path, suffixes=(".jpg",)))


def test_tar_link_inside_is_skipped_not_followed(tmp_path):
    path = _tar(
        tmp_path / "ok.tar.gz", [("d/a.jpg", b"1")], links=[("d/l.jpg", "a.jpg", tarfile.SYMTYPE)]
    )
    assert list(iter_archive(path, suffixes=(".jpg",))) == [("d/a.jpg", b"1")]


def test_zip_symlink_outside_refused(tmp_path):
    path = tmp_path / "link.zip"
    with zipfile.ZipFile(path, "w") as z:
        info = zipfile.ZipInfo("d/l.png")
        info.external_attr = (0o120777 << 16) | 0x20  # S_IFLNK
        z.writestr(info, "../../secret")
    with pytest.raises(ArchiveError, match="refusing link"):
        list(iter_archive(path, suffixes=(".png",)))


def test_truncated_zip_and_tar_named_in_error(tmp_path):
    good = _zip(tmp_path / "g.zip", [(f"d/{i}.png", bytes(range(256)) * 20) for i in range(5)])
    cut = tmp_path / "cut.zip"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="cut.zip"):
        list(iter_archive(cut, suffixes=(".png",)))
    tar = _tar(tmp_path / "g.tar.gz", [(f"d/{i}.jpg", bytes(range(256)) * 50) for i in range(20)])
    cut_tar = tmp_path / "cut.tar.gz"
    cut_tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    with pytest.raises(ArchiveError, match="cut.tar.gz"):
        list(iter_archive(cut_tar, suffixes=(".jpg",)))


def test_corrupted_zip_member_named(tmp_path):
    data = bytes(range(256)) * 40
    path = _zip(tmp_path / "c.zip", [("d/a.png", data)])
    raw = bytearray(path.read_bytes())
    pos = raw.index(b"d/a.png") + len("d/a.png") + 100  # inside the first member's data
    raw[pos] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ArchiveError, match="d/a.png"):
        list(iter_archive(path, suffixes=(".png",)))


def test_unknown_type_and_gzip_errors(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not an archive at all")
    with pytest.raises(ArchiveError, match="junk.bin"):
        list(iter_archive(junk, suffixes=(".png",)))
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(b"0123456789" * 1000))
    assert read_gzip(gz) == b"0123456789" * 1000
    gz.write_bytes(gz.read_bytes()[:30])
    with pytest.raises(ArchiveError, match="x.gz"):
        read_gzip(gz)
    with pytest.raises(FileNotFoundError):
        list(iter_archive(tmp_path / "missing.zip", suffixes=(".png",)))
