"""Safe archive reading: unsafe members refused, damaged archives named, sizes capped."""

import gzip
import io
import struct
import tarfile
import tracemalloc
import zipfile
import zlib

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


# --------------------------------------------------------------------------------------------
# Decompression caps: bombs fail at once, with low peak memory
# --------------------------------------------------------------------------------------------

GIB = 2**30
MIB = 2**20


def _deflated_zeros(size):
    """A raw deflate stream of ``size`` zero bytes (a multiple of 1 MiB), built without
    compressing them all: after a full flush every 1 MiB block compresses to the same bytes."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(bytes(MIB)) + c.flush(zlib.Z_FULL_FLUSH)
    assert block == again
    return block * (size // MIB) + c.flush()


def _crc_of_zeros(size, crc=0):
    zeros = bytes(MIB)
    for _ in range(size // MIB):
        crc = zlib.crc32(zeros, crc)
    return crc


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    """A zip, a tar.gz and a .gz, each about 1 MB on disk and 1 GiB decompressed (valid files:
    CRCs and sizes are right, so a reader without a cap inflates all of it)."""
    root = tmp_path_factory.mktemp("bombs")
    body = _deflated_zeros(GIB)
    crc = _crc_of_zeros(GIB)
    # zip: local header, data, central directory, end record (no zip64 needed below 4 GiB).
    name = b"d/bomb.png"
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0x21, crc, len(body), GIB,
                        len(name), 0)  # fmt: skip
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0x21, crc,
                          len(body), GIB, len(name), 0, 0, 0, 0, 0, 0)  # fmt: skip
    offset = len(local) + len(name) + len(body)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central) + len(name), offset, 0)
    (root / "bomb.zip").write_bytes(local + name + body + central + name + end)
    # .gz of the zeros; tar.gz of a tar holding one 1 GiB member of zeros.
    gz_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
    trailer = struct.pack("<II", crc, GIB % 2**32)
    (root / "bomb.gz").write_bytes(gz_header + body + trailer)
    info = tarfile.TarInfo("d/bomb.jpg")
    info.size = GIB
    header = info.tobuf(format=tarfile.GNU_FORMAT)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    tail_zeros = GIB + 2 * MIB  # member data, then zero blocks (end of archive and padding)
    tar_crc = _crc_of_zeros(tail_zeros, zlib.crc32(header))
    trailer = struct.pack("<II", tar_crc, (len(header) + tail_zeros) % 2**32)
    (root / "bomb.tar.gz").write_bytes(gz_header + head + _deflated_zeros(tail_zeros) + trailer)
    return root


def _peak_bytes(fn):
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_bombs_are_small_and_genuine(bombs):
    for name in ("bomb.zip", "bomb.gz", "bomb.tar.gz"):
        assert (bombs / name).stat().st_size < 2 * MIB, name
    with zipfile.ZipFile(bombs / "bomb.zip") as z:
        (info,) = z.infolist()
        assert info.file_size == GIB
        with z.open(info) as f:
            assert f.read(MIB) == bytes(MIB)  # a reader without a cap would go on to 1 GiB
    with tarfile.open(bombs / "bomb.tar.gz") as t:
        assert t.next().size == GIB
    with gzip.open(bombs / "bomb.gz") as f:
        assert f.read(MIB) == bytes(MIB)


@pytest.mark.parametrize("name", ["bomb.zip", "bomb.tar.gz"])
def test_archive_bomb_fails_before_inflating(bombs, name):
    match = r"decompresses to 1073741824 bytes, more than max_member_bytes=67108864 \(64 MiB\)"

    def read():
        with pytest.raises(ArchiveError, match=match):
            list(iter_archive(bombs / name, suffixes=(".png", ".jpg")))

    assert _peak_bytes(read) < 8 * MIB  # it used to be 2.8 GB for the zip


def test_gzip_bomb_stops_at_the_cap(bombs):
    def read(cap):
        with pytest.raises(
            ArchiveError, match=rf"bomb.gz decompresses to more than max_bytes={cap} "
        ):
            read_gzip(bombs / "bomb.gz", max_bytes=cap)

    assert _peak_bytes(lambda: read(4 * MIB)) < 16 * MIB
    assert _peak_bytes(lambda: read(64 * MIB)) < 160 * MIB  # the default cap, far below 1 GiB


def test_zip_member_with_a_lying_size_is_not_inflated(bombs, tmp_path):
    """A central directory that declares 1 KiB for the 1 GiB member: reading stops there."""
    raw = bytearray((bombs / "bomb.zip").read_bytes())
    for sig, field in ((b"PK\x03\x04", 22), (b"PK\x01\x02", 24)):
        pos = raw.index(sig)
        raw[pos + field : pos + field + 4] = struct.pack("<I", 1024)
    path = tmp_path / "liar.zip"
    path.write_bytes(bytes(raw))

    def read():
        with pytest.raises(ArchiveError, match="liar.zip: member 'd/bomb.png' is corrupted"):
            list(iter_archive(path, suffixes=(".png",)))

    assert _peak_bytes(read) < 8 * MIB


def test_caps_are_arguments(tmp_path):
    members = [(f"d/{i}.png", bytes([i]) * (3 * MIB // 2)) for i in range(3)]
    z = _zip(tmp_path / "three.zip", members)
    t = _tar(tmp_path / "three.tar.gz", [(n.replace(".png", ".jpg"), d) for n, d in members])
    assert len(list(iter_archive(z, suffixes=(".png",)))) == 3  # the defaults are generous
    assert len(list(iter_archive(t, suffixes=(".jpg",)))) == 3
    match = r"'d/0.png' decompresses to 1572864 bytes, more than max_member_bytes=1048576 \("
    with pytest.raises(ArchiveError, match=match):
        list(iter_archive(z, suffixes=(".png",), max_member_bytes=MIB))
    with pytest.raises(ArchiveError, match="max_member_bytes=1048576"):
        list(iter_archive(t, suffixes=(".jpg",), max_member_bytes=MIB))
    for path, suffix in ((z, ".png"), (t, ".jpg")):
        with pytest.raises(ArchiveError, match=r"more than max_total_bytes=4194304 \(4 MiB\)"):
            list(iter_archive(path, suffixes=(suffix,), max_total_bytes=4 * MIB))
    gz = tmp_path / "x.gz"
    gz.write_bytes(gzip.compress(bytes(2 * MIB)))
    assert len(read_gzip(gz)) == 2 * MIB
    with pytest.raises(
        ArchiveError, match=r"x.gz decompresses to more than max_bytes=1048576 \(1 MiB\)"
    ):
        read_gzip(gz, max_bytes=MIB)
    with pytest.raises(ValueError, match="max_member_bytes must be a positive int, got 0"):
        list(iter_archive(z, suffixes=(".png",), max_member_bytes=0))
