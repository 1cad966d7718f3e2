"""Tests of images.py: what a JPEG or PNG is, its size, and the same photo without its location."""

import io
import random
import struct

import pytest
from PIL import Image

import images
from conftest import MINIMAL_EXIF, exif_segment, exif_tiff, jpeg_segment, make_jpeg, make_png


def stripped(data, content_type="image/jpeg"):
    """What would be stored: the pieces strip_location() keeps, joined."""
    pieces = images.strip_location(data, content_type)
    return data if pieces is None else b"".join(pieces)


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


def test_stripping_keeps_every_pixel():
    sent = make_jpeg(48, 40, segments=[exif_segment(exif_tiff()), jpeg_segment(0xFE, b"GPS 52.52N")])
    assert pixels(stripped(sent)) == pixels(sent)
