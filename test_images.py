"""Tests of images.py: what a JPEG or PNG is, its size, and the same photo without its location."""

import io
import random
import struct

import pytest
from PIL import Image

import images
from conftest import (
    LOCATING_SEGMENTS,
    MINIMAL_EXIF,
    exif_segment,
    exif_tiff,
    jpeg_segment,
    make_jpeg,
    make_png,
    png_chunk,
)


def stripped(data, content_type="image/jpeg"):
    """What would be stored: the pieces strip_location() keeps, joined."""
    pieces = images.strip_location(data, content_type)
    return data if pieces is None else b"".join(data[p] if isinstance(p, slice) else p for p in pieces)


def pixels(data):
    """Decode an image with Pillow (libjpeg, libpng): what browsers would show."""
    with Image.open(io.BytesIO(data)) as image:
        return image.size, image.tobytes()


def test_orientation_goes_first_when_there_is_no_jfif_segment():
    rest = make_jpeg()[20:]  # the segments after APP0, and the image data
    sent = b"\xff\xd8" + exif_segment(exif_tiff()) + rest
    assert stripped(sent) == b"\xff\xd8" + exif_segment(MINIMAL_EXIF["<"]) + rest


@pytest.mark.parametrize("data, content_type", [(make_jpeg(), "image/jpeg"), (make_png(), "image/png")])
def test_nothing_to_remove_means_no_pieces_to_copy(data, content_type):
    assert images.strip_location(data, content_type) is None


def test_corrupted_exif_never_breaks_an_upload():
    rng = random.Random(20261122)
    exif = b"Exif\x00\x00" + exif_tiff()
    allowed = {b"", exif_segment(MINIMAL_EXIF["<"])} | {
        exif_segment(MINIMAL_EXIF[order][:-8] + struct.pack(order + "HHI", value, 0, 0))
        for order in "<>"
        for value in range(2, 9)
    }
    plain = make_jpeg()
    for _ in range(500):
        damaged = bytearray(exif)
        for _ in range(rng.randint(1, 6)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        del damaged[rng.randrange(len(damaged) + 1) if rng.random() < 0.3 else len(damaged) :]
        result = stripped(make_jpeg(segments=[jpeg_segment(0xE1, bytes(damaged))]))
        assert result.endswith(plain[20:])  # every segment after APP0 and the image data, untouched
        assert result[:20] == plain[:20] and result[20 : -len(plain[20:])] in allowed
        assert images.inspect(result).content_type == "image/jpeg"


def short_segment(marker, payload, missing):
    """A header segment whose length field declares ``missing`` bytes fewer than it holds."""
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2 - missing) + payload


# Equivalents of real files that libjpeg, Pillow and browsers decode with a warning ("extraneous
# bytes before marker"), built after Pillow's Tests/images: each has stray bytes between segments.
PHOTOSHOP_IRB = b"Photoshop 3.0\x008BIM\x04\x04\x00\x00\x00\x00\x00\x0c\x1c\x02\x5a\x00\x06Berlin" + bytes(16)
ADOBE = b"Adobe\x00\x64\x00\x00\x00\x00\x01"
STRAY_BYTES = {
    "junk after a comment": (
        [jpeg_segment(0xFE, b"a comment"), b"hello"],
        [],
    ),
    "Photoshop APP13 declaring 16 bytes too few": (
        [exif_segment(exif_tiff()), short_segment(0xED, PHOTOSHOP_IRB, 16)],
        [exif_segment(MINIMAL_EXIF["<"])],
    ),
    "Adobe APP14 declaring 1 byte too few": (
        [short_segment(0xEE, ADOBE, 1)],
        [jpeg_segment(0xEE, ADOBE[:-1])],
    ),
}


@pytest.mark.parametrize("segments, kept", STRAY_BYTES.values(), ids=STRAY_BYTES.keys())
def test_stray_bytes_between_segments_are_skipped_as_libjpeg_does(segments, kept):
    sent = make_jpeg(64, 32, segments=segments)
    assert pixels(sent)[0] == (64, 32)  # libjpeg decodes it
    assert images.inspect(sent) == images.ImageInfo("image/jpeg", 64, 32)
    result = stripped(sent)
    assert result == make_jpeg(64, 32, segments=kept)  # and what is stored has no stray bytes
    assert pixels(result) == pixels(sent)


HEAD, REST = make_jpeg()[:20], make_jpeg()[20:]  # SOI and APP0; the other segments and the image data
REFUSED = {
    "no marker after the stray bytes": HEAD + b"no marker follows",  # libjpeg fails too
    "only stuffed bytes after them": HEAD + b"\xff\x00" * 8,  # and here
    "more stray bytes than the bound": HEAD + b"x" * (images.MAX_JPEG_JUNK_BYTES + 1) + REST,  # our bound
}


@pytest.mark.parametrize("data", REFUSED.values(), ids=REFUSED.keys())
def test_stray_bytes_are_skipped_only_up_to_a_marker_within_a_bound(data):
    with pytest.raises(images.InvalidImage, match="expected a marker"):
        images.inspect(data)


def test_stripping_keeps_every_pixel():
    sent = make_jpeg(48, 40, segments=[exif_segment(exif_tiff()), jpeg_segment(0xFE, b"GPS 52.52N")])
    assert pixels(stripped(sent)) == pixels(sent)


def progressive(plain=make_jpeg(64, 32)):
    """A JPEG with a second scan after the first, metadata segments and a table between them."""
    first_scan_end = plain.index(b"\xff\xd9")
    table = jpeg_segment(0xC4, b"\x10\x01" + b"\x00" * 15 + b"\xff")  # 0xFF inside a table is no marker
    scan = jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x12\xff\x00\x34\xff\xd0\x56" * 40
    metadata = exif_segment(exif_tiff()) + jpeg_segment(0xFE, b"GPS 52.52N")
    sent = plain[:first_scan_end] + metadata + table + metadata + scan + b"\xff\xd9" + b"trailing video"
    kept = plain[:first_scan_end] + table + scan + b"\xff\xd9"
    return sent, kept


@pytest.mark.parametrize("window", [*range(1, 24), 64, 1000, images.SCAN_WINDOW])
def test_the_scan_finds_the_same_markers_whatever_its_window(monkeypatch, window):
    monkeypatch.setattr(images, "SCAN_WINDOW", window)
    sent, kept = progressive()
    released = []
    pieces = images.strip_location(sent, "image/jpeg", release=released.append)
    assert b"".join(sent[p] if isinstance(p, slice) else p for p in pieces) == kept
    assert released == sorted(released) and all(offset <= len(sent) for offset in released)


SENT = {
    "phone photo": make_jpeg(64, 32, segments=[exif_segment(exif_tiff()), *LOCATING_SEGMENTS]),
    "upright photo": make_jpeg(64, 32, segments=[exif_segment(exif_tiff(orientation=1))]),
    "no metadata": make_jpeg(64, 32),
    "motion photo": make_jpeg(64, 32, segments=[exif_segment(exif_tiff(">"))]) + b"ftypmp42 video",
    "stray bytes": make_jpeg(64, 32, segments=[jpeg_segment(0xFE, b"c"), b"junk"]),
    "progressive": progressive()[0],
    "png": make_png(extra_chunks=[png_chunk(b"tEXt", b"Comment\x00GPS")]) + b"trailer",
}


@pytest.mark.parametrize("sent", SENT.values(), ids=SENT.keys())
def test_stripping_what_was_stripped_removes_nothing(sent):
    content_type = images.inspect(sent).content_type
    once = stripped(sent, content_type)
    assert images.strip_location(once, content_type) is None


@pytest.mark.parametrize("sent", SENT.values(), ids=SENT.keys())
def test_a_header_stripped_ahead_gives_what_stripping_the_whole_file_gives(sent):
    """What a large upload's spool writes: its header without location as soon as it is all there."""
    for cut in range(len(sent) + 1):
        header = images.strip_header(sent[:cut])
        if header is not None:
            break
    pieces, end = header
    if not sent.startswith(b"\xff\xd8"):
        assert header == (None, 0)
        return
    head = b"".join(sent[p] if isinstance(p, slice) else p for p in pieces or [slice(0, end)])
    ahead = head + sent[end:]  # what the spool holds
    assert stripped(ahead) == stripped(sent)
    assert cut < len(sent) and images.strip_header(sent[: cut - 1]) is None


def test_pieces_that_follow_on_are_one_slice():
    pieces = images.strip_location(SENT["motion photo"], "image/jpeg")
    assert len(pieces) == 3 and isinstance(pieces[1], bytes)  # SOI and APP0, the orientation, the rest
    assert images.strip_location(stripped(SENT["motion photo"]) + b"more video", "image/jpeg") == [
        slice(0, len(stripped(SENT["motion photo"])))
    ]
