"""Tests of the HTTP contract, built from the app factory with a temporary uploads folder."""

import builtins
import fcntl
import functools
import hashlib
import io
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData
from werkzeug.test import EnvironBuilder, run_wsgi_app

import analysis
import app as app_module
import storage
from app import create_app, find_part

REAL_ID = "3b241101-e2bb-4255-8caf-4136c566a962"
PINNED_MOCK_OILY = {
    "image_id": "mock_oily",
    "skin_type": "Oily",
    "issues": ["Hyperpigmentation"],
    "confidence": 0.82,
}
PINNED_REAL_ID = {"image_id": REAL_ID, "skin_type": "Dry", "issues": ["Dehydration"], "confidence": 0.8}
KEY = "test-key-0123456789"
OTHER_KEY = "rotated-key-9876543210"
HERE = Path(__file__).parent
UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


# --- images made in code -------------------------------------------------------


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_png(width=4, height=3, extra_chunks=()):
    """A valid RGB PNG of a flat colour."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    rows = (b"\x00" + b"\x80\x60\x50" * width) * height
    return b"".join(
        [
            storage.PNG_SIGNATURE,
            header,
            *extra_chunks,
            png_chunk(b"IDAT", zlib.compress(rows)),
            png_chunk(b"IEND", b""),
        ]
    )


def jpeg_segment(marker, payload):
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def make_jpeg(width=16, height=8, size=None, noise=b"", segments=()):
    """A valid, decodable baseline greyscale JPEG, padded to exactly ``size`` bytes in its scan data.

    ``noise`` goes into the scan data too, so that otherwise equal images differ; ``segments``
    are extra header segments after APP0.
    """
    blocks = -(-width // 8) * -(-height // 8)
    head = b"".join(
        [
            b"\xff\xd8",
            jpeg_segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"),
            *segments,
            jpeg_segment(0xDB, b"\x00" + b"\x01" * 64),
            jpeg_segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"),
            # One-symbol Huffman tables: DC difference 0 and end-of-block, each coded as a 0 bit.
            jpeg_segment(0xC4, b"\x00" + b"\x01" + b"\x00" * 15 + b"\x00"),
            jpeg_segment(0xC4, b"\x10" + b"\x01" + b"\x00" * 15 + b"\x00"),
            jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00"),
        ]
    )
    # All-zero bits decode every block; decoders skip what follows them up to the EOI marker.
    data = b"\x00" * -(-blocks * 2 // 8) + noise
    if size is not None:
        missing = size - len(head) - len(data) - 2
        assert missing >= 0
        data += b"\x00" * missing
    return head + data + b"\xff\xd9"


# --- fixtures ------------------------------------------------------------------


@pytest.fixture
def uploads(tmp_path):
    folder = tmp_path / "uploads"
    folder.mkdir()
    return folder


@pytest.fixture
def make_app(uploads):
    def build(**env):
        return create_app({"UPLOAD_DIR": str(uploads), "API_KEY": KEY, **env})

    return build


@pytest.fixture
def client(make_app):
    return make_app().test_client()


def stored_files(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name != storage.KEY_FILE)


def upload(
    client, data, filename="photo.jpg", content_type="image/jpeg", key=KEY, path="/upload", headers=None
):
    return client.post(
        path,
        headers={"X-API-Key": key, **(headers or {})},
        data={"file": (io.BytesIO(data), filename, content_type)},
        content_type="multipart/form-data",
    )


def analyze(client, image_id, key=KEY, path="/analyze"):
    return client.post(path, headers={"X-API-Key": key}, json={"image_id": image_id})


def assert_problem(response, status, code):
    assert response.status_code == status, response.get_data(as_text=True)
    assert response.mimetype == "application/problem+json"
    body = response.get_json()
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] and body["title"]
    assert isinstance(body["detail"], str) and body["detail"]
    return body


# --- health --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/health", "/api/v1/health"])
def test_health_needs_no_key(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.get_json() == {"status": "healthy"}


def test_health_reports_missing_folder(client, uploads):
    shutil.rmtree(uploads)
    assert_problem(client.get("/health"), 503, "storage_unavailable")


def test_health_reports_a_disk_too_full_for_one_more_upload(client, monkeypatch):
    full = os.statvfs_result((4096, 4096, 1000, 10, 10, 1000, 10, 10, 0, 255))
    monkeypatch.setattr(storage.os, "statvfs", lambda path: full)
    assert "full" in assert_problem(client.get("/health"), 503, "storage_unavailable")["detail"]


# --- upload --------------------------------------------------------------------


@pytest.mark.parametrize("prefix", ["", "/api/v1"])
@pytest.mark.parametrize(
    "data, content_type, extension, width, height",
    [
        (make_jpeg(640, 480), "image/jpeg", ".jpg", 640, 480),
        (make_png(300, 200), "image/png", ".png", 300, 200),
    ],
)
def test_upload_stores_image(client, uploads, prefix, data, content_type, extension, width, height):
    response = upload(client, data, path=f"{prefix}/upload")
    assert response.status_code == 201
    body = response.get_json()
    image_id = body["image_id"]
    assert UUID4.fullmatch(image_id)
    assert body == {
        "image_id": image_id,
        "content_type": content_type,
        "size_bytes": len(data),
        "size": app_module.human_size(len(data)),
        "width": width,
        "height": height,
    }
    assert response.headers["Location"] == f"{prefix}/images/{image_id}"
    assert (uploads / f"{image_id}{extension}").read_bytes() == data
    assert stored_files(uploads) == [f"{image_id}{extension}"]


def test_upload_ignores_client_filename_and_content_type(client, uploads):
    response = upload(client, make_jpeg(), filename="../../evil.png", content_type="text/html")
    assert response.status_code == 201
    assert response.get_json()["content_type"] == "image/jpeg"
    assert stored_files(uploads) == [response.get_json()["image_id"] + ".jpg"]


def test_upload_reports_human_size(client):
    response = upload(client, make_jpeg(size=1_450_000))
    assert response.get_json()["size"] == "1.45 MB"


@pytest.mark.parametrize(
    "size, expected",
    [
        (0, "0 B"),
        (786, "786 B"),
        (999, "999 B"),
        (1000, "1.00 KB"),
        (999_999, "1.00 MB"),
        (5_242_880, "5.24 MB"),
    ],
)
def test_human_size(size, expected):
    assert app_module.human_size(size) == expected


def test_upload_accepts_exactly_the_limit(client, uploads):
    response = upload(client, make_jpeg(size=5_242_880))
    assert response.status_code == 201
    assert response.get_json()["size_bytes"] == 5_242_880


def test_upload_refuses_one_byte_over_the_limit(client, uploads):
    assert_problem(upload(client, make_jpeg(size=5_242_881)), 413, "file_too_large")
    assert stored_files(uploads) == []


def test_form_data_around_the_file_may_add_64_kib(make_app, uploads):
    client = make_app(MAX_UPLOAD_BYTES="2000").test_client()
    note = ("note", b"n" * 60_000)
    fits = multipart(
        [(b'Content-Disposition: form-data; name="note"', note[1]), (FILE_HEADERS, make_jpeg(size=2000))]
    )
    too_much = fits.replace(note[1], note[1] * 2)
    headers = {"X-API-Key": KEY, "Content-Type": "multipart/form-data; boundary=b0undary"}
    assert client.post("/upload", headers=headers, data=fits).status_code == 201
    detail = assert_problem(client.post("/upload", headers=headers, data=too_much), 413, "file_too_large")[
        "detail"
    ]
    assert "64 KiB of other form data" in detail


def test_doubled_slashes_are_not_redirected(client):
    assert_problem(client.post("/api/v1//upload", headers={"X-API-Key": KEY}), 404, "not_found")


def test_upload_limit_is_configurable(make_app, uploads):
    client = make_app(MAX_UPLOAD_BYTES="2000").test_client()
    assert upload(client, make_jpeg(size=2000)).status_code == 201
    assert_problem(upload(client, make_jpeg(size=2001)), 413, "file_too_large")


def test_upload_refuses_huge_body_before_reading_it(client, uploads):
    class Unreadable(io.BytesIO):
        def read(self, *args):
            raise AssertionError("the body must not be read")

        readline = readinto = read

    environ = EnvironBuilder(
        path="/upload",
        method="POST",
        headers={"X-API-Key": KEY, "Content-Type": "multipart/form-data; boundary=x"},
        input_stream=Unreadable(),
    ).get_environ()
    environ["CONTENT_LENGTH"] = "60000000"
    body, status, headers = run_wsgi_app(client.application, environ, buffered=True)
    assert status == "413 REQUEST ENTITY TOO LARGE"
    assert json.loads(b"".join(body))["code"] == "file_too_large"
    assert stored_files(uploads) == []


def multipart(parts, boundary="b0undary"):
    """Build a multipart body by hand from ``(headers, content)`` parts."""
    body = b"".join(
        b"--%s\r\n%s\r\n\r\n%s\r\n" % (boundary.encode(), headers, content) for headers, content in parts
    )
    return body + b"--%s--\r\n" % boundary.encode()


FILE_HEADERS = b'Content-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png'
BAD_UPLOADS = {
    "no file field": ({"other": (io.BytesIO(make_png()), "a.png")}, 400, "missing_file"),
    "file is a text field": ({"file": "just text"}, 400, "unsupported_type"),
    "empty file": ({"file": (io.BytesIO(b""), "a.png")}, 400, "empty_file"),
    "text sent as png": (
        {"file": (io.BytesIO(b"hello, world"), "a.png", "image/png")},
        400,
        "unsupported_type",
    ),
    "html renamed png": (
        {"file": (io.BytesIO(b"<html><script>x</script></html>"), "a.png")},
        400,
        "unsupported_type",
    ),
    "svg renamed png": (
        {"file": (io.BytesIO(b'<svg xmlns="http://www.w3.org/2000/svg"/>'), "a.png")},
        400,
        "unsupported_type",
    ),
    "gif": ({"file": (io.BytesIO(b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"), "a.gif")}, 400, "unsupported_type"),
    "png signature only": ({"file": (io.BytesIO(storage.PNG_SIGNATURE), "a.png")}, 400, "invalid_image"),
    "png truncated": ({"file": (io.BytesIO(make_png()[:60]), "a.png")}, 400, "invalid_image"),
    "png bad header checksum": (
        {"file": (io.BytesIO(make_png()[:29] + b"\0\0\0\0" + make_png()[33:]), "a.png")},
        400,
        "invalid_image",
    ),
    "png zero width": ({"file": (io.BytesIO(make_png(0, 5)), "a.png")}, 400, "invalid_image"),
    "png over 100 megapixels": (
        {"file": (io.BytesIO(make_png(20000, 5001)), "a.png")},
        400,
        "image_too_large",
    ),
    "jpeg signature only": ({"file": (io.BytesIO(b"\xff\xd8\xff"), "a.jpg")}, 400, "invalid_image"),
    "jpeg truncated in header": ({"file": (io.BytesIO(make_jpeg()[:30]), "a.jpg")}, 400, "invalid_image"),
    "jpeg truncated in scan": ({"file": (io.BytesIO(make_jpeg()[:-2]), "a.jpg")}, 400, "invalid_image"),
    "jpeg without frame header": (
        {
            "file": (
                io.BytesIO(b"\xff\xd8" + jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\xff\xd9"),
                "a.jpg",
            )
        },
        400,
        "invalid_image",
    ),
    "jpeg declaring 60000x60000": (
        {
            "file": (
                io.BytesIO(make_jpeg().replace(struct.pack(">HH", 8, 16), struct.pack(">HH", 60000, 60000))),
                "a.jpg",
            )
        },
        400,
        "image_too_large",
    ),
}


@pytest.mark.parametrize("form, status, code", BAD_UPLOADS.values(), ids=BAD_UPLOADS.keys())
def test_bad_uploads_are_refused_and_nothing_is_stored(client, uploads, form, status, code):
    response = client.post(
        "/upload", headers={"X-API-Key": KEY}, data=form, content_type="multipart/form-data"
    )
    body = assert_problem(response, status, code)
    if code == "unsupported_type":
        assert "JPEG" in body["detail"] and "PNG" in body["detail"]
    assert stored_files(uploads) == []


BAD_BODIES = {
    "json instead of multipart": ("application/json", b'{"file": "x"}', "missing_file"),
    "raw image body": ("image/png", make_png(), "missing_file"),
    "no boundary": ("multipart/form-data", multipart([(FILE_HEADERS, make_png())]), "invalid_multipart"),
    "missing closing boundary": (
        "multipart/form-data; boundary=b0undary",
        multipart([(FILE_HEADERS, make_png())])[: -len(b"--b0undary--\r\n")],
        "invalid_multipart",
    ),
    "part without content-disposition": (
        "multipart/form-data; boundary=b0undary",
        multipart([(b"Content-Type: image/png", make_png())]),
        "invalid_multipart",
    ),
    "part headers over 16 KiB": (
        "multipart/form-data; boundary=b0undary",
        multipart([(FILE_HEADERS + b"\r\nX-Pad: " + b"a" * 17_000, make_png())]),
        "invalid_multipart",
    ),
    "too many parts": (
        "multipart/form-data; boundary=b0undary",
        multipart([(b'Content-Disposition: form-data; name="f"', b"x")] * 1001),
        "invalid_multipart",
    ),
    "blank body": ("multipart/form-data; boundary=b0undary", b"\r\n", "invalid_multipart"),
}


@pytest.mark.parametrize("content_type, body, code", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_malformed_upload_requests(client, uploads, content_type, body, code):
    response = client.post("/upload", headers={"X-API-Key": KEY, "Content-Type": content_type}, data=body)
    assert_problem(response, 400, code)
    assert stored_files(uploads) == []


def test_concurrent_uploads_get_distinct_ids_and_intact_files(make_app, uploads):
    app = make_app()
    images = [make_jpeg(8 * (i + 1), 8, size=20_000 + i) for i in range(32)]

    def send(data):
        return upload(app.test_client(), data)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, images))
    ids = [r.get_json()["image_id"] for r in responses]
    assert all(r.status_code == 201 for r in responses)
    assert len(set(ids)) == len(images)
    for image_id, data in zip(ids, images):
        assert (uploads / f"{image_id}.jpg").read_bytes() == data


def test_file_part_without_filename_is_accepted(client, uploads):
    body = multipart([(b'Content-Disposition: form-data; name="file"', make_jpeg())])
    response = client.post(
        "/upload",
        headers={"X-API-Key": KEY, "Content-Type": "multipart/form-data; boundary=b0undary"},
        data=body,
    )
    assert response.status_code == 201
    assert stored_files(uploads) == [response.get_json()["image_id"] + ".jpg"]


def test_chunked_body_without_server_support_needs_a_length(client):
    response = client.post(
        "/upload",
        headers={
            "X-API-Key": KEY,
            "Content-Type": "multipart/form-data; boundary=b",
            "Transfer-Encoding": "chunked",
        },
        input_stream=io.BytesIO(b"x"),
    )
    assert_problem(response, 411, "length_required")


@pytest.mark.parametrize("errno_name, status", [("ENOSPC", 507), ("EIO", 503)])
def test_storage_failure_leaves_nothing_behind(client, uploads, monkeypatch, errno_name, status):
    import errno

    def fail(fd):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(storage.os, "fsync", fail)
    body = assert_problem(upload(client, make_jpeg()), status, "storage_unavailable")
    assert str(uploads) not in json.dumps(body)
    assert list(uploads.iterdir()) == []


def test_failed_folder_sync_takes_the_upload_back(client, uploads, monkeypatch):
    def fail():
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(storage.Storage, "_sync_folder", lambda self: fail())
    assert_problem(upload(client, make_jpeg()), 503, "storage_unavailable")
    assert list(uploads.iterdir()) == []


def test_unfinished_uploads_are_ignored_and_removed_at_start(make_app, uploads):
    leftover = uploads / f"{storage.TEMP_PREFIX}{uuid.uuid4().hex}"
    leftover.write_bytes(make_jpeg()[:100])
    client = make_app().test_client()
    assert not leftover.exists()
    assert stored_files(uploads) == []
    assert analyze(client, str(uuid.uuid4())).status_code == 404


# --- location metadata ---------------------------------------------------------------

# Orientation 6 alone, written out by hand rather than with the code under test.
MINIMAL_EXIF = {
    "<": b"II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x06\x00\x00\x00\x00\x00\x00\x00",
    ">": b"MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06\x00\x00\x00\x00\x00\x00",
}
ICC = jpeg_segment(0xE2, b"ICC_PROFILE\x00\x01\x01a colour profile")
LOCATING_SEGMENTS = [
    jpeg_segment(0xE1, b"http://ns.adobe.com/xap/1.0/\x00<exif:GPSLatitude>52,31.2N</exif:GPSLatitude>"),
    jpeg_segment(0xED, b"Photoshop 3.0\x008BIM\x04\x04\x00\x00\x00\x00\x00\x0c\x1c\x02\x5a\x00\x06Berlin"),
    jpeg_segment(0xFE, b"shot at 52.52N 13.40E"),
    jpeg_segment(0xEB, b"JP\x00\x00vendor data: lat 52.52"),
]


def exif_tiff(order="<", orientation=6, orientation_type=3, ifd0=8, ifd0_next=0, gps_pointer=None, magic=42):
    """An Exif block: IFD0 with Make, Orientation and a pointer to a GPS IFD holding a position."""

    def pack(fmt, *values):
        return struct.pack(order + fmt, *values)

    def ifd(entries, next_ifd):
        packed = b"".join(pack("HHI", t, k, c) + v.ljust(4, b"\x00") for t, k, c, v in entries)
        return pack("H", len(entries)) + packed + pack("I", next_ifd)

    entries = [(0x010F, 2, 4, b"Pix\x00")]
    if orientation is not None:
        entries.append((0x0112, orientation_type, 1, pack("H", orientation)))
    gps_offset = 8 + 2 + 12 * (len(entries) + 1) + 4
    entries.append((0x8825, 4, 1, pack("I", gps_offset if gps_pointer is None else gps_pointer)))
    gps = [(1, 2, 2, b"N\x00"), (3, 2, 2, b"E\x00")]
    header = (b"II" if order == "<" else b"MM") + pack("HI", magic, ifd0)
    return header + ifd(entries, ifd0_next) + ifd(gps, 0) + b"GPS 52.52N 13.40E"


def exif_segment(tiff):
    return jpeg_segment(0xE1, b"Exif\x00\x00" + tiff)


def stored_image(uploads, response):
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    extension = storage.EXTENSIONS[body["content_type"]]
    data = (uploads / f"{body['image_id']}{extension}").read_bytes()
    assert body["size_bytes"] == len(data)
    return data


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_upload_drops_location_metadata_but_keeps_orientation(client, uploads, order):
    sent = make_jpeg(segments=[exif_segment(exif_tiff(order)), ICC, *LOCATING_SEGMENTS])
    stored = stored_image(uploads, upload(client, sent))
    assert stored == make_jpeg(segments=[exif_segment(MINIMAL_EXIF[order]), ICC])


def test_orientation_goes_first_when_there_is_no_jfif_segment():
    rest = make_jpeg()[20:]  # the segments after APP0, and the image data
    sent = b"\xff\xd8" + exif_segment(exif_tiff()) + rest
    assert storage.strip_location(sent, "image/jpeg") == b"\xff\xd8" + exif_segment(MINIMAL_EXIF["<"]) + rest


@pytest.mark.parametrize("orientation", [1, None], ids=["upright", "absent"])
def test_no_orientation_segment_when_there_is_nothing_to_keep(client, uploads, orientation):
    sent = make_jpeg(segments=[exif_segment(exif_tiff(orientation=orientation))])
    assert stored_image(uploads, upload(client, sent)) == make_jpeg()


@pytest.mark.parametrize(
    "data, content_type",
    [(make_jpeg(segments=[ICC]), "image/jpeg"), (make_png(), "image/png")],
    ids=["jpeg", "png"],
)
def test_images_without_metadata_are_stored_as_sent(client, uploads, data, content_type):
    assert storage.strip_location(data, content_type) is data  # no copy of a large upload
    assert stored_image(uploads, upload(client, data, content_type=content_type)) == data


MALFORMED_EXIF = {
    "empty": lambda order: b"",
    "truncated-header": lambda order: exif_tiff(order)[:6],
    "bad-byte-order": lambda order: b"XX" + exif_tiff(order)[2:],
    "bad-magic-number": lambda order: exif_tiff(order, magic=43),
    "ifd-past-the-end": lambda order: exif_tiff(order, ifd0=5000),
    "ifd-inside-the-header": lambda order: exif_tiff(order, ifd0=4),
    "entry-count-overruns": lambda order: (
        exif_tiff(order)[:8] + struct.pack(order + "H", 500) + exif_tiff(order)[10:]
    ),
    "entries-cut-short": lambda order: exif_tiff(order)[:30],
    "orientation-not-a-short": lambda order: exif_tiff(order, orientation_type=4),
    "orientation-0": lambda order: exif_tiff(order, orientation=0),
    "orientation-9": lambda order: exif_tiff(order, orientation=9),
    "ifd-chain-loops": lambda order: exif_tiff(order, ifd0_next=8),
    "ifd-chain-past-the-end": lambda order: exif_tiff(order, ifd0_next=0xFFFFFFF0),
    "gps-pointer-loops": lambda order: exif_tiff(order, gps_pointer=8),
    "gps-pointer-past-the-end": lambda order: exif_tiff(order, gps_pointer=99999),
}


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
@pytest.mark.parametrize("make_tiff", MALFORMED_EXIF.values(), ids=MALFORMED_EXIF.keys())
def test_malformed_exif_is_stored_with_no_metadata_at_all(client, uploads, order, make_tiff):
    sent = make_jpeg(segments=[exif_segment(make_tiff(order)), *LOCATING_SEGMENTS])
    assert stored_image(uploads, upload(client, sent)) == make_jpeg()


def test_corrupted_exif_never_breaks_an_upload():
    rng = random.Random(20261122)
    exif = b"Exif\x00\x00" + exif_tiff()
    allowed = {b"", exif_segment(MINIMAL_EXIF["<"])} | {
        exif_segment(MINIMAL_EXIF[order][:-8] + struct.pack(order + "HHI", value, 0, 0))
        for order in "<>"
        for value in range(2, 9)
    }
    for _ in range(500):
        damaged = bytearray(exif)
        for _ in range(rng.randint(1, 6)):
            damaged[rng.randrange(len(damaged))] = rng.randrange(256)
        del damaged[rng.randrange(len(damaged) + 1) if rng.random() < 0.3 else len(damaged) :]
        stripped = storage.strip_location(
            make_jpeg(segments=[jpeg_segment(0xE1, bytes(damaged))]), "image/jpeg"
        )
        plain = make_jpeg()
        assert stripped.endswith(plain[20:])  # every segment after APP0 and the image data, untouched
        assert stripped[:20] == plain[:20] and stripped[20 : -len(plain[20:])] in allowed
        assert storage.inspect_image(stripped).content_type == "image/jpeg"


def test_what_follows_the_image_is_dropped(client, uploads):
    """A second image with its own Exif (MPO, gain maps) or a motion photo's video after EOI."""
    mpf = jpeg_segment(0xE2, b"MPF\x00II*\x00\x08\x00\x00\x00")
    second = make_jpeg(segments=[exif_segment(exif_tiff())])
    sent = make_jpeg(segments=[ICC, mpf]) + second + b"ftypmp42 ... GPS 52.52N"
    assert stored_image(uploads, upload(client, sent)) == make_jpeg(segments=[ICC])


def test_metadata_between_progressive_scans_is_dropped(client, uploads):
    plain = make_jpeg()
    first_scan_end = plain.index(b"\xff\xd9")
    # A second scan, preceded by a table (kept) and by metadata segments (dropped).
    table = jpeg_segment(0xC4, b"\x10\x01" + b"\x00" * 15 + b"\xff")  # 0xFF inside a table is no marker
    scan = jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x12\xff\x00\x34\xff\xd0\x56"
    tail = b"\xff\xd9"
    sent = plain[:first_scan_end] + exif_segment(exif_tiff()) + table + LOCATING_SEGMENTS[2] + scan + tail
    stored = stored_image(uploads, upload(client, sent))
    assert stored == plain[:first_scan_end] + table + scan + tail


def test_png_loses_what_follows_iend(client, uploads):
    sent = make_png() + b"PK\x03\x04 a zip with a location.txt"
    assert stored_image(uploads, upload(client, sent, content_type="image/png")) == make_png()


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_png_text_and_exif_chunks_are_dropped(client, uploads, order):
    gamma = png_chunk(b"gAMA", struct.pack(">I", 45455))
    text = [
        png_chunk(b"tEXt", b"Comment\x00GPS 52.52 13.40"),
        png_chunk(b"zTXt", b"Location\x00\x00" + zlib.compress(b"Berlin")),
        png_chunk(
            b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00<exif:GPSLatitude>52,31N</exif:GPSLatitude>"
        ),
    ]
    sent = make_png(extra_chunks=[png_chunk(b"eXIf", exif_tiff(order)), *text, gamma])
    stored = stored_image(uploads, upload(client, sent, content_type="image/png"))
    assert stored == make_png(extra_chunks=[png_chunk(b"eXIf", MINIMAL_EXIF[order]), gamma])


# --- multipart parsing, against Werkzeug's own parser ---------------------------


def werkzeug_part(body, boundary):
    """The raw bytes of the first part named ``file``, as Werkzeug's own multipart decoder sees them."""
    decoder = MultipartDecoder(boundary, max_parts=app_module.MAX_PARTS)
    found, current, chunks = None, None, []
    try:
        for piece in (body, None):  # a complete body, then its end
            decoder.receive_data(piece)
            while not isinstance(event := decoder.next_event(), (NeedData, Epilogue)):
                if isinstance(event, (Field, File)):
                    current, chunks = event.name, []
                elif isinstance(event, Data):
                    chunks.append(event.data)
                    if not event.more_data and current == "file" and found is None:
                        found = b"".join(chunks)
            if isinstance(event, Epilogue):
                return found
    except Exception:  # ValueError for malformed bodies, RequestEntityTooLarge for too many parts
        return None
    return None


def our_part(body, boundary):
    try:
        found = find_part(body, boundary, "file")
    except app_module.MultipartError:
        return None
    return None if found is None else body[found[0] : found[1]]


PAYLOAD = make_png() + b"\r\n--notquite\r\n--b0undar" + os.urandom(512) + b"\r\n"


def corpus():
    """Bodies as real clients build them, and hostile variants of them."""
    boundary = "------------------------d74496d66958873e"  # curl
    yield (
        "curl",
        boundary,
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="face.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + PAYLOAD
        + f"\r\n--{boundary}--\r\n".encode(),
    )
    boundary = "3f8a9c5e2b8d4f1e9a7c6b5d4e3f2a1b"  # requests
    yield (
        "requests",
        boundary,
        (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="face.png"\r\n\r\n').encode()
        + PAYLOAD
        + f"\r\n--{boundary}--\r\n".encode(),
    )
    boundary = "--------------------------123456789012345678901234"  # Postman / newman
    yield (
        "postman",
        boundary,
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="face.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + PAYLOAD
        + f"\r\n--{boundary}--\r\n".encode(),
    )
    boundary = "a7f1e0c2-4b5d-4e8f-9a1b-2c3d4e5f6a7b"  # OkHttp: UUID boundary, Content-Length per part
    yield (
        "okhttp",
        boundary,
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="face.png"\r\n'
            f"Content-Type: image/png\r\nContent-Length: {len(PAYLOAD)}\r\n\r\n"
        ).encode()
        + PAYLOAD
        + f"\r\n--{boundary}--\r\n".encode(),
    )
    boundary = "Boundary-6C2A4E1F-8B3D-4F5A-9E7C-1D2B3A4C5E6F"  # URLSession, hand-built bodies
    yield (
        "urlsession",
        boundary,
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="IMG_0001.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + PAYLOAD
        + f"\r\n--{boundary}--\r\n".encode(),
    )
    boundary = "xyz"

    def base(disposition, content=PAYLOAD, tail=b"\r\n--xyz--\r\n"):
        return b"--xyz\r\nContent-Disposition: " + disposition + b"\r\n\r\n" + content + tail

    yield "filename*", boundary, base(b"form-data; name=\"file\"; filename*=UTF-8''f%C3%A4ce.png")
    yield "unquoted name", boundary, base(b"form-data; name=file; filename=a.png")
    yield "no filename (a field)", boundary, base(b'form-data; name="file"')
    yield "empty filename", boundary, base(b'form-data; name="file"; filename=""')
    yield "other name", boundary, base(b'form-data; name="image"; filename="a.png"')
    yield (
        "preamble and epilogue",
        boundary,
        b"This is a preamble.\r\n"
        + base(b'form-data; name="file"; filename="a.png"', tail=b"\r\n--xyz--\r\nThis is an epilogue.\r\n"),
    )
    yield "no closing boundary", boundary, base(b'form-data; name="file"; filename="a.png"', tail=b"\r\n")
    yield (
        "closing boundary without CRLF",
        boundary,
        base(b'form-data; name="file"; filename="a.png"', tail=b"\r\n--xyz--"),
    )
    yield (
        "boundary with trailing blanks",
        boundary,
        base(b'form-data; name="file"; filename="a.png"', tail=b"\r\n--xyz--  \r\n"),
    )
    yield (
        "boundary inside data",
        boundary,
        base(b'form-data; name="file"; filename="a.png"', PAYLOAD + b"--xyz" + PAYLOAD),
    )
    yield (
        "boundary after LF inside data",
        boundary,
        base(b'form-data; name="file"; filename="a.png"', b"ab\n--xyzz\n" + PAYLOAD),
    )
    yield (
        "CRLF inside data",
        boundary,
        base(b'form-data; name="file"; filename="a.png"', b"\r\n\r\n" + PAYLOAD + b"\r\n"),
    )
    yield "empty content", boundary, base(b'form-data; name="file"; filename="a.png"', b"")
    yield (
        "LF line breaks",
        boundary,
        b'--xyz\nContent-Disposition: form-data; name="file"; filename="a"\n\n' + PAYLOAD + b"\n--xyz--\n",
    )
    yield (
        "folded header",
        boundary,
        b'--xyz\r\nContent-Disposition: form-data;\r\n name="file"; filename="a"\r\n\r\nabc\r\n--xyz--\r\n',
    )
    yield (
        "two file parts",
        boundary,
        (
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="1"\r\n\r\nfirst\r\n'
            b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="2"\r\n\r\nsecond\r\n--xyz--\r\n'
        ),
    )
    yield "no content-disposition", boundary, b"--xyz\r\nContent-Type: image/png\r\n\r\nabc\r\n--xyz--\r\n"
    yield (
        "headers never end",
        boundary,
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n',
    )
    yield (
        "non-UTF-8 header",
        boundary,
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="\xff"\r\n\r\nabc\r\n--xyz--\r\n',
    )
    yield "empty form", boundary, b"--xyz--\r\n"
    yield "no boundary at all", boundary, PAYLOAD
    yield (
        "many parts",
        boundary,
        b'--xyz\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n' * 1500 + b"--xyz--\r\n",
    )
    yield (
        "regex characters in boundary",
        "a.b*c+d?",
        b'--a.b*c+d?\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc\r\n--a.b*c+d?--\r\n',
    )
    yield (
        "quoted boundary with space",
        "x y",
        b'--x y\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\nabc\r\n--x y--\r\n',
    )


@pytest.mark.parametrize("label, boundary, body", list(corpus()), ids=[case[0] for case in corpus()])
def test_multipart_parser_agrees_with_werkzeug(label, boundary, body):
    assert our_part(body, boundary.encode()) == werkzeug_part(body, boundary.encode())


def test_multipart_parser_agrees_with_werkzeug_on_cut_bodies():
    """Every prefix-cut and byte-flip of a real body gives the same answer from both parsers."""
    boundary = "xyz"
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="a"\r\n\r\n1\r\n'
        b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="f"\r\n\r\n\r\n--xy\rz\n\r\r\n--xyz--\r\n'
    )
    variants = [body[:cut] for cut in range(len(body))]
    variants += [
        body[:i] + bytes([b]) + body[i + 1 :] for i in range(len(body)) for b in (0x0D, 0x0A, 0x2D, 0x20)
    ]
    for variant in variants:
        assert our_part(variant, boundary.encode()) == werkzeug_part(variant, boundary.encode()), variant


# --- analyze -------------------------------------------------------------------


@pytest.fixture
def image_id(client):
    return upload(client, make_jpeg()).get_json()["image_id"]


def test_analyze_returns_a_plausible_result(client, image_id):
    response = analyze(client, image_id)
    assert response.status_code == 200
    body = response.get_json()
    assert list(body) == ["image_id", "skin_type", "issues", "confidence"]
    assert body["image_id"] == image_id
    assert body["skin_type"] in analysis.SKIN_TYPES
    assert set(body["issues"]) <= set(analysis.PLAUSIBLE_ISSUES[body["skin_type"]])
    assert body["confidence"] == round(body["confidence"], 2) and 0.70 <= body["confidence"] <= 0.99


@pytest.mark.parametrize("prefix", ["", "/api/v1"])
def test_analyze_is_byte_identical_on_repeat_and_via_query(client, image_id, prefix):
    first = analyze(client, image_id, path=f"{prefix}/analyze").data
    assert analyze(client, image_id, path=f"{prefix}/analyze").data == first
    response = client.post(f"{prefix}/analyze?image_id={image_id}", headers={"X-API-Key": KEY})
    assert response.status_code == 200 and response.data == first


def test_analyze_is_the_same_in_two_app_instances(tmp_path):
    data = make_jpeg()
    image_id = str(uuid.uuid4())
    bodies = []
    for name in ("one", "two"):
        folder = tmp_path / name
        folder.mkdir()
        (folder / f"{image_id}.jpg").write_bytes(data)
        client = create_app({"UPLOAD_DIR": str(folder), "API_KEY": KEY}).test_client()
        bodies.append((analyze(client, image_id).data, analyze(client, "mock_dry_7").data))
    assert bodies[0] == bodies[1]


def test_analyze_is_stored_and_survives_a_logic_change(client, uploads, image_id, monkeypatch):
    first = analyze(client, image_id).data
    assert (uploads / f"{image_id}.json").read_bytes() == first
    monkeypatch.setattr(analysis, "analyze", lambda image_id: {"image_id": image_id, "skin_type": "Changed"})
    assert analyze(client, image_id).data == first


def call_wsgi(wsgi_app, image_id, headers=None, stream=None):
    body = json.dumps({"image_id": image_id}).encode()
    environ = EnvironBuilder(
        path="/analyze",
        method="POST",
        data=body,
        headers={"X-API-Key": KEY, "X-Request-ID": "fixed", **(headers or {})},
    ).get_environ()
    if stream is not None:
        environ["wsgi.input"] = stream
    chunks, status, response_headers = run_wsgi_app(wsgi_app, environ, buffered=True)
    return status, dict(response_headers), b"".join(chunks)


def test_stored_analysis_shortcut_answers_exactly_as_flask(make_app, capsys):
    app = make_app()
    client = app.test_client()
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    analyze(client, image_id)
    admission = app.wsgi_app
    assert isinstance(admission.app, app_module.StoredAnalysisShortcut)
    capsys.readouterr()
    fast = call_wsgi(admission, image_id)
    fast_log = capsys.readouterr().out
    slow = call_wsgi(app_module.Admission(admission.app.flask, app), image_id)
    slow_log = capsys.readouterr().out
    assert fast == slow and fast[0] == "200 OK"

    def without_timing(log):
        return re.sub(r"\S*T\S*Z|duration_ms=\S+", "", log)

    assert without_timing(fast_log) == without_timing(slow_log)
    assert "analysis=stored" in fast_log and "request_id=fixed" in fast_log


class Stalled(io.RawIOBase):
    def readable(self):
        return True

    def readinto(self, buffer):
        raise TimeoutError("timed out")


def test_stored_analysis_shortcut_leaves_errors_to_flask(make_app):
    app = make_app()
    image_id = upload(app.test_client(), make_jpeg()).get_json()["image_id"]
    analyze(app.test_client(), image_id)
    status, headers, body = call_wsgi(app.wsgi_app, image_id, stream=Stalled())
    assert status.startswith("408") and json.loads(body)["code"] == "request_timeout"
    status, headers, body = call_wsgi(app.wsgi_app, image_id, headers={"X-API-Key": "wrong"})
    assert status.startswith("401") and headers["Content-Type"] == "application/problem+json"
    status, _, body = call_wsgi(app.wsgi_app, str(uuid.uuid4()))
    assert status.startswith("404") and json.loads(body)["code"] == "image_not_found"


def test_stored_analysis_shortcut_refuses_chunked_bodies_over_the_limit(make_app):
    app = make_app()
    image_id = upload(app.test_client(), make_jpeg()).get_json()["image_id"]
    analyze(app.test_client(), image_id)
    body = json.dumps({"image_id": image_id}).encode() + b" " * 20_000
    environ = EnvironBuilder(
        path="/analyze", method="POST", input_stream=io.BytesIO(body), headers={"X-API-Key": KEY}
    ).get_environ()
    environ["wsgi.input_terminated"] = True  # chunked: no Content-Length
    del environ["CONTENT_LENGTH"]
    chunks, status, _ = run_wsgi_app(app.wsgi_app, environ, buffered=True)
    assert status.startswith("413") and json.loads(b"".join(chunks))["code"] == "request_too_large"


def test_health_does_not_queue_behind_busy_requests(make_app):
    app = make_app()
    gate = app.extensions["gate"]
    with gate, gate:  # every slot taken
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(app.test_client().get, "/health").result(timeout=5).status_code == 200


def test_images_and_analyses_persist_across_restart(make_app, uploads):
    client = make_app().test_client()
    image_id = upload(client, make_png()).get_json()["image_id"]
    first = analyze(client, image_id).data
    restarted = make_app().test_client()
    assert analyze(restarted, image_id).data == first


def test_analysis_is_deterministic_and_spread():
    ids = [str(uuid.UUID(int=n, version=4)) for n in range(2000)]
    results = [analysis.analyze(i) for i in ids]
    assert results == [analysis.analyze(i) for i in ids]
    assert {r["skin_type"] for r in results} == set(analysis.SKIN_TYPES)
    assert {len(r["issues"]) for r in results} == {0, 1, 2, 3}
    assert {r["confidence"] for r in results} == {p / 100 for p in range(70, 100)}
    for result in results:
        assert result["issues"] == sorted(result["issues"], key=analysis.ISSUES.index)


def test_analysis_pins_known_values():
    """A change here changes every client's results: it must be deliberate."""
    assert analysis.analyze("mock_oily") == PINNED_MOCK_OILY
    assert analysis.analyze(REAL_ID) == PINNED_REAL_ID


@pytest.mark.parametrize(
    "fixture_id, skin_type",
    [
        ("mock_oily", "Oily"),
        ("mock_dry_2", "Dry"),
        ("mock_combination_user-7", "Combination"),
        ("mock_sensitive", "Sensitive"),
        ("mock_normal_a", "Normal"),
    ],
)
def test_fixture_ids_need_no_upload(client, uploads, fixture_id, skin_type):
    response = analyze(client, fixture_id)
    assert response.status_code == 200
    assert response.get_json()["skin_type"] == skin_type
    assert response.data == analyze(client, fixture_id).data
    assert stored_files(uploads) == []


BAD_ANALYZE = {
    "not json": (b"image_id=x", "text/plain", "invalid_request"),
    "invalid utf-8": (b'{"image_id": "\xff"}', "application/json", "invalid_request"),
    "json array": (b'["x"]', "application/json", "invalid_request"),
    "json string": (b'"x"', "application/json", "invalid_request"),
    "missing image_id": (b'{"id": "x"}', "application/json", "invalid_request"),
    "number image_id": (b'{"image_id": 5}', "application/json", "invalid_request"),
    "null image_id": (b'{"image_id": null}', "application/json", "invalid_request"),
    "empty body": (b"", "application/json", "invalid_request"),
    "deeply nested array": (b"[" * 5000, "application/json", "invalid_request"),
    "deeply nested value": (
        b'{"image_id": "x", "a": ' + b"[" * 5000 + b"]" * 5000 + b"}",
        "application/json",
        "invalid_request",
    ),
}


@pytest.mark.parametrize("body, content_type, code", BAD_ANALYZE.values(), ids=BAD_ANALYZE.keys())
def test_bad_analyze_requests(client, body, content_type, code):
    response = client.post("/analyze", headers={"X-API-Key": KEY, "Content-Type": content_type}, data=body)
    assert_problem(response, 400, code)


HOSTILE_IDS = [
    "",
    "../etc/passwd",
    "../../../../etc/passwd",
    "/etc/passwd",
    "..%2F..%2Fetc%2Fpasswd",
    "%2e%2e%2f",
    "..\\..\\windows",
    "abc\x00def",
    REAL_ID + "\x00",
    REAL_ID[:-1],
    REAL_ID[:8],
    REAL_ID + ".jpg",
    REAL_ID + ".json",
    REAL_ID.upper(),
    REAL_ID.replace("-", ""),
    "{" + REAL_ID + "}",
    " " + REAL_ID,
    REAL_ID + "\n",
    REAL_ID.replace("a", "\uff41"),  # fullwidth look-alike
    "mock_oily/../../x",
    "mock_unknown",
    "MOCK_OILY",
    "mock_oily_" + "x" * 100,
    "a" * 10_000,
    ".api_key",
    ".tmp-" + "0" * 32,
]


@pytest.fixture
def filesystem_calls(monkeypatch):
    """Record every path the service touches through os and open()."""
    calls = []
    for name in (
        "stat",
        "lstat",
        "open",
        "link",
        "rename",
        "unlink",
        "access",
        "statvfs",
        "listdir",
        "scandir",
        "mkdir",
    ):
        original = getattr(os, name)

        def spy(path, *args, _original=original, **kwargs):
            calls.append(os.fspath(path) if isinstance(path, (str, bytes, os.PathLike)) else path)
            return _original(path, *args, **kwargs)

        monkeypatch.setattr(os, name, spy)
    original_open = io.open

    def open_spy(file, *args, **kwargs):
        calls.append(os.fspath(file) if isinstance(file, (str, bytes, os.PathLike)) else file)
        return original_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", open_spy)
    monkeypatch.setattr(builtins, "open", open_spy)
    return calls


@pytest.mark.parametrize("bad_id", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
def test_hostile_ids_are_refused_before_touching_the_filesystem(client, uploads, filesystem_calls, bad_id):
    (uploads / f"{REAL_ID}.jpg").write_bytes(make_jpeg())
    filesystem_calls.clear()
    assert_problem(analyze(client, bad_id), 400, "invalid_image_id")
    assert_problem(
        client.post("/analyze", query_string={"image_id": bad_id}, headers={"X-API-Key": KEY}),
        400,
        "invalid_image_id",
    )
    for method in ("GET", "DELETE"):
        # In a path, a slash or NUL can also miss the route: 404 rather than 400, as safe.
        response = client.open(
            "/images/" + urllib.parse.quote(bad_id), method=method, headers={"X-API-Key": KEY}
        )
        assert response.status_code in (400, 404) and response.mimetype == "application/problem+json"
    assert filesystem_calls == []
    assert stored_files(uploads) == [f"{REAL_ID}.jpg"]


def test_unknown_id_touches_only_the_uploads_folder(client, uploads, filesystem_calls):
    filesystem_calls.clear()
    assert_problem(analyze(client, str(uuid.uuid4())), 404, "image_not_found")
    assert_problem(delete(client, str(uuid.uuid4())), 404, "image_not_found")
    assert filesystem_calls
    assert all(Path(path).parent == uploads for path in filesystem_calls if isinstance(path, str))


# --- inspect -------------------------------------------------------------------


def test_image_metadata(client, image_id):
    response = client.get(f"/images/{image_id}", headers={"X-API-Key": KEY})
    body = response.get_json()
    assert response.status_code == 200
    assert body["analyzed"] is False and body["width"] == 16 and body["content_type"] == "image/jpeg"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", body["uploaded_at"])
    analyze(client, image_id)
    assert client.get(f"/api/v1/images/{image_id}", headers={"X-API-Key": KEY}).get_json()["analyzed"] is True
    assert_problem(client.get(f"/images/{uuid.uuid4()}", headers={"X-API-Key": KEY}), 404, "image_not_found")
    assert_problem(client.get(f"/images/{image_id}.jpg", headers={"X-API-Key": KEY}), 400, "invalid_image_id")


# --- delete ----------------------------------------------------------------------


def delete(client, image_id, key=KEY, path="/images/"):
    return client.delete(path + image_id, headers={"X-API-Key": key})


@pytest.mark.parametrize("prefix", ["", "/api/v1"])
def test_delete_removes_the_image_and_everything_about_it(make_app, uploads, prefix, capsys):
    client = make_app().test_client()
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    analyze(client, image_id)
    response = delete(client, image_id, path=prefix + "/images/")
    assert response.status_code == 204 and response.data == b"" and "Content-Type" not in response.headers
    assert stored_files(uploads) == []
    assert_problem(client.get(f"/images/{image_id}", headers={"X-API-Key": KEY}), 404, "image_not_found")
    assert_problem(analyze(client, image_id), 404, "image_not_found")
    assert_problem(delete(client, image_id), 404, "image_not_found")
    assert f"method=DELETE path={prefix}/images/{image_id} status=204" in capsys.readouterr().out


@pytest.mark.parametrize("bad_id", ["nope", f"{REAL_ID}.jpg", REAL_ID.upper(), "..", "mock_oily"])
def test_delete_refuses_malformed_ids(client, uploads, image_id, bad_id):
    assert_problem(delete(client, bad_id), 400, "invalid_image_id")
    assert len(stored_files(uploads)) == 1


def test_analysis_racing_a_delete_is_never_left_behind(make_app, uploads, monkeypatch):
    app = make_app()
    folder = app.extensions["storage"]
    image_id = upload(app.test_client(), make_jpeg()).get_json()["image_id"]
    real_write = folder.write_new

    def delete_meanwhile(path, data, replace):
        created = real_write(path, data, replace)
        if path.endswith(".json"):  # the worst moment: after the image was checked, before its re-check
            assert delete(app.test_client(), image_id).status_code == 204
        return created

    monkeypatch.setattr(folder, "write_new", delete_meanwhile)
    assert_problem(analyze(app.test_client(), image_id), 404, "image_not_found")
    assert stored_files(uploads) == []


# --- safe retries: Idempotency-Key ----------------------------------------------------


def upload_once(client, data, idempotency_key, key=KEY):
    return upload(client, data, key=key, headers={"Idempotency-Key": idempotency_key})


def image_names(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.suffix in (".jpg", ".png"))


def test_a_retry_gets_the_first_upload_back(client, uploads):
    data = unique_jpeg(20_000)
    first = upload_once(client, data, '"retry-1"')
    again = upload_once(client, data, "retry-1")  # the same key, quoted or not
    assert first.status_code == again.status_code == 201
    assert again.data == first.data and again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert image_names(uploads) == [first.get_json()["image_id"] + ".jpg"]


def test_idempotency_keys_belong_to_one_api_key(make_app, uploads):
    client = make_app(API_KEY=f"{KEY},{OTHER_KEY}").test_client()
    data = unique_jpeg(20_000)
    mine = upload_once(client, data, "k", key=KEY).get_json()["image_id"]
    theirs = upload_once(client, data, "k", key=OTHER_KEY).get_json()["image_id"]
    assert mine != theirs and len(image_names(uploads)) == 2


def test_the_same_key_with_other_bytes_is_refused(client, uploads):
    first = upload_once(client, unique_jpeg(20_000), "k").get_json()["image_id"]
    assert_problem(upload_once(client, unique_jpeg(20_000), "k"), 422, "idempotency_key_reused")
    assert image_names(uploads) == [first + ".jpg"]


@pytest.mark.parametrize(
    "value",
    ["", '""', '"', '"unbalanced', "k" * 256, "caf\u00e9", "tab\there", 'a"b', "back\\slash"],
    ids=[
        "empty",
        "empty-quoted",
        "lone-quote",
        "unbalanced",
        "256-chars",
        "non-ascii",
        "control",
        "inner-quote",
        "backslash",
    ],
)
def test_malformed_idempotency_keys_are_refused(client, uploads, value):
    response = upload(client, make_jpeg(), headers={"Idempotency-Key": value.encode().decode("latin-1")})
    assert_problem(response, 400, "invalid_idempotency_key")
    assert stored_files(uploads) == []


def test_the_longest_key_is_accepted(client):
    assert upload_once(client, make_jpeg(), "k" * 255).status_code == 201


def test_a_retry_during_the_first_upload_is_a_conflict(make_app, uploads, monkeypatch):
    app = make_app()
    folder = app.extensions["storage"]
    inside, release = threading.Event(), threading.Event()
    real_store = folder._store

    def slow_store(*args):
        inside.set()
        release.wait(10)
        return real_store(*args)

    monkeypatch.setattr(folder, "_store", slow_store)
    data = unique_jpeg(20_000)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(upload_once, app.test_client(), data, "k")
        assert inside.wait(10)
        assert_problem(upload_once(app.test_client(), data, "k"), 409, "idempotency_conflict")
        release.set()
        assert first.result().status_code == 201
    assert upload_once(app.test_client(), data, "k").data == first.result().data


def test_a_crash_between_the_key_and_the_image_does_not_make_two_images(make_app, uploads, monkeypatch):
    app = make_app()
    folder = app.extensions["storage"]
    data = unique_jpeg(20_000)
    with monkeypatch.context() as patch:
        patch.setattr(
            folder, "_store", lambda *args: (_ for _ in ()).throw(storage.StorageUnavailable("down"))
        )
        assert_problem(upload_once(app.test_client(), data, "k"), 503, "storage_unavailable")
    assert image_names(uploads) == []
    retried = upload_once(app.test_client(), data, "k")
    assert retried.status_code == 201 and "Idempotent-Replayed" not in retried.headers
    assert upload_once(app.test_client(), data, "k").headers["Idempotent-Replayed"] == "true"
    assert image_names(uploads) == [retried.get_json()["image_id"] + ".jpg"]


def test_keys_are_forgotten_after_their_time(make_app, uploads, monkeypatch):
    client = make_app(IDEMPOTENCY_TTL_HOURS="1").test_client()
    data = unique_jpeg(20_000)
    first = upload_once(client, data, "k").get_json()["image_id"]
    later = time.time() + 3601
    monkeypatch.setattr(storage.time, "time", lambda: later)
    second = upload_once(client, data, "k")
    assert "Idempotent-Replayed" not in second.headers and second.get_json()["image_id"] != first


def test_deleting_an_image_whose_key_expired_leaves_no_record(make_app, uploads, monkeypatch):
    app = make_app(IDEMPOTENCY_TTL_HOURS="1")
    image_id = upload_once(app.test_client(), unique_jpeg(20_000), "k").get_json()["image_id"]
    later = time.time() + 7200
    monkeypatch.setattr(storage.time, "time", lambda: later)
    app.test_cli_runner().invoke(args=["purge", "--older-than", "1"])  # removes the expired record
    assert delete(app.test_client(), image_id).status_code == 204
    assert stored_files(uploads) == []


def test_deleting_an_image_forgets_its_key(client, uploads):
    data = unique_jpeg(20_000)
    first = upload_once(client, data, "k").get_json()["image_id"]
    assert delete(client, first).status_code == 204
    assert stored_files(uploads) == []
    second = upload_once(client, data, "k")
    assert second.status_code == 201 and second.get_json()["image_id"] != first


def test_without_a_key_every_upload_is_new(client, uploads):
    data = unique_jpeg(20_000)
    assert upload(client, data).get_json()["image_id"] != upload(client, data).get_json()["image_id"]
    assert not [p for p in uploads.iterdir() if "idem" in p.name]


def test_a_keyed_upload_into_a_vanished_folder_is_503(client, uploads):
    shutil.rmtree(uploads)
    assert_problem(upload_once(client, make_jpeg(), "k"), 503, "storage_unavailable")


def test_a_delete_waits_for_an_upload_holding_its_key_but_not_for_ever(client, uploads, monkeypatch):
    image_id = upload_once(client, make_jpeg(), "k").get_json()["image_id"]
    (record,) = uploads.glob(storage.IDEMPOTENCY_PREFIX + "*")
    monkeypatch.setattr(storage, "LOCK_WAIT_SECONDS", 0.2)
    with open(record, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as an upload with that key would
        assert "busy" in assert_problem(delete(client, image_id), 503, "storage_unavailable")["detail"]
    assert delete(client, image_id).status_code == 204
    assert stored_files(uploads) == []


def test_a_delete_clears_what_an_interrupted_delete_left(client, uploads):
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    analyze(client, image_id)
    (uploads / f"{image_id}.jpg").unlink()  # a crash between removing the image and its analysis
    assert_problem(delete(client, image_id), 404, "image_not_found")
    assert stored_files(uploads) == []


# --- retention: the purge command -------------------------------------------------------


def age(uploads, image_id, days):
    (path,) = (p for p in uploads.glob(f"{image_id}.*") if p.suffix in (".jpg", ".png"))
    when = time.time() - days * 86400
    os.utime(path, (when, when))


@pytest.mark.parametrize("dry_run", [False, True], ids=["purge", "dry-run"])
def test_purge_deletes_what_is_past_the_retention_age(make_app, uploads, dry_run):
    app = make_app(RETENTION_DAYS="30")
    client = app.test_client()
    old, recent = (upload_once(client, unique_jpeg(5_000), f"k{n}").get_json()["image_id"] for n in range(2))
    analyze(client, old)
    age(uploads, old, 31)
    age(uploads, recent, 29)
    before = stored_files(uploads)
    result = app.test_cli_runner().invoke(args=["purge", *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 0, result.output
    assert old in result.output and recent not in result.output
    if dry_run:
        assert stored_files(uploads) == before
    else:
        assert not [name for name in stored_files(uploads) if old in name]
        assert client.get(f"/images/{recent}", headers={"X-API-Key": KEY}).status_code == 200
        assert upload_once(client, unique_jpeg(5_000), "k0").status_code == 201  # its key went with it


def test_purge_older_than_overrides_the_setting(make_app, uploads):
    app = make_app()
    image_id = upload(app.test_client(), make_jpeg()).get_json()["image_id"]
    age(uploads, image_id, 3)
    assert "nothing" in app.test_cli_runner().invoke(args=["purge", "--older-than", "4"]).output.lower()
    result = app.test_cli_runner().invoke(args=["purge", "--older-than", "2"])
    assert result.exit_code == 0 and image_id in result.output
    assert stored_files(uploads) == []


def test_purge_clears_old_leftovers_of_crashes(make_app, uploads):
    app = make_app()
    client = app.test_client()
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    analyze(client, image_id)
    (uploads / f"{image_id}.jpg").unlink()  # as a crash in a delete would leave it
    app.test_cli_runner().invoke(args=["purge", "--older-than", "1"])
    assert stored_files(uploads) == [f"{image_id}.json"]  # recent: it may belong to an upload in progress
    when = time.time() - storage.LEFTOVER_AGE - 60
    os.utime(uploads / f"{image_id}.json", (when, when))
    app.test_cli_runner().invoke(args=["purge", "--older-than", "1"])
    assert stored_files(uploads) == []


def test_purge_needs_an_age(make_app):
    result = make_app().test_cli_runner().invoke(args=["purge"])
    assert result.exit_code != 0 and "RETENTION_DAYS" in result.output


def test_purge_removes_expired_idempotency_records(make_app, uploads):
    app = make_app(IDEMPOTENCY_TTL_HOURS="1")
    upload_once(app.test_client(), unique_jpeg(5_000), "k")
    (record,) = uploads.glob(storage.IDEMPOTENCY_PREFIX + "*")
    app.test_cli_runner().invoke(args=["purge", "--older-than", "1"])
    assert record.exists()  # still within its hour
    when = time.time() - 7200
    record.write_text(json.dumps({**json.loads(record.read_text()), "created_at": int(when)}))
    os.utime(record, (when, when))
    app.test_cli_runner().invoke(args=["purge", "--older-than", "1"])
    assert not record.exists()


def test_the_flask_command_finds_the_app_and_leaves_uploads_in_progress_alone(uploads):
    in_progress = uploads / f"{storage.TEMP_PREFIX}{uuid.uuid4().hex}"  # a live service writing
    in_progress.write_bytes(b"half an image")
    result = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", "purge", "--older-than", "1", "--dry-run"],
        cwd=HERE,
        env={**os.environ, "UPLOAD_DIR": str(uploads), "API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "nothing" in result.stdout.lower()
    assert in_progress.exists()


# --- authentication ------------------------------------------------------------

PROTECTED = [
    ("POST", "/upload"),
    ("POST", "/analyze"),
    ("GET", f"/images/{REAL_ID}"),
    ("DELETE", f"/images/{REAL_ID}"),
]
BAD_KEYS = {
    "missing": None,
    "empty": "",
    "wrong": "wrong-key",
    "prefix of the key": KEY[:-1],
    "key with suffix": KEY + "x",
    "very long": "k" * 8000,
    "latin-1": "cl\u00e9",
    "raw UTF-8 bytes": "ключ".encode().decode("latin-1"),
}


@pytest.mark.parametrize("prefix", ["", "/api/v1"])
@pytest.mark.parametrize("method, path", PROTECTED)
@pytest.mark.parametrize("key", BAD_KEYS.values(), ids=BAD_KEYS.keys())
def test_protected_routes_need_a_valid_key(client, uploads, prefix, method, path, key):
    headers = {} if key is None else {"X-API-Key": key}
    response = client.open(
        prefix + path, method=method, headers=headers, data={"file": (io.BytesIO(make_jpeg()), "a.jpg")}
    )
    assert_problem(response, 401, "unauthorized")
    assert "X-API-Key" in response.headers["WWW-Authenticate"]
    assert stored_files(uploads) == []


def test_empty_key_file_stops_the_start(uploads):
    (uploads / storage.KEY_FILE).write_text("\n")
    with pytest.raises(SystemExit, match="no usable key"):
        create_app({"UPLOAD_DIR": str(uploads)})


def test_unknown_routes_need_a_key_too(client):
    assert_problem(client.get("/nope"), 401, "unauthorized")


def test_several_keys_allow_rotation(make_app):
    client = make_app(API_KEY=f" {KEY} , {OTHER_KEY} ,").test_client()
    assert analyze(client, "mock_oily", key=KEY).status_code == 200
    assert analyze(client, "mock_oily", key=OTHER_KEY).status_code == 200
    assert analyze(client, "mock_oily", key="").status_code == 401


def test_generated_key_is_persisted_and_shared(uploads, capsys):
    first = create_app({"UPLOAD_DIR": str(uploads)})
    key_file = uploads / storage.KEY_FILE
    key = key_file.read_text()
    assert len(key) >= 40
    out = capsys.readouterr().out
    assert str(key_file) in out and key not in out
    second = create_app({"UPLOAD_DIR": str(uploads)})
    for app in (first, second):
        assert analyze(app.test_client(), "mock_dry", key=key).status_code == 200
        assert analyze(app.test_client(), "mock_dry", key="").status_code == 401


def test_generated_keys_differ_between_installs(tmp_path):
    keys = set()
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        create_app({"UPLOAD_DIR": str(tmp_path / name)})
        keys.add((tmp_path / name / storage.KEY_FILE).read_text())
    assert len(keys) == 2


# --- errors, request ids, logs ---------------------------------------------------


def test_method_not_allowed_keeps_allow_header(client):
    response = client.get("/upload", headers={"X-API-Key": KEY})
    assert_problem(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_unknown_route_is_problem_json(client):
    assert_problem(client.get("/nope", headers={"X-API-Key": KEY}), 404, "not_found")


def test_unexpected_error_hides_details_and_logs_traceback(make_app, uploads, capsys, monkeypatch):
    client = make_app().test_client()

    def explode(image_id):
        raise RuntimeError(f"secret detail in {uploads}")

    monkeypatch.setattr(analysis, "analyze", explode)
    response = analyze(client, "mock_oily")
    body = assert_problem(response, 500, "internal_error")
    assert "secret" not in response.get_data(as_text=True) and "Traceback" not in body["detail"]
    out = capsys.readouterr().out
    assert "Traceback" in out and "secret detail" in out and response.headers["X-Request-ID"] in out


def test_request_id_is_echoed_or_generated(client):
    assert client.get("/health", headers={"X-Request-ID": "abc-123"}).headers["X-Request-ID"] == "abc-123"
    for insane in ("", "a b", "x" * 200, "id\u00e9"):
        generated = client.get("/health", headers={"X-Request-ID": insane}).headers["X-Request-ID"]
        assert re.fullmatch(r"[0-9a-f]{32}", generated)


def test_json_logs_one_line_per_request_with_what_it_did(make_app, capsys):
    client = make_app(LOG_FORMAT="json").test_client()
    capsys.readouterr()
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    analyze(client, image_id)
    analyze(client, "../x")
    analyze(client, image_id)
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(line["level"], line["method"], line["path"], line["status"]) for line in lines] == [
        ("INFO", "POST", "/upload", 201),
        ("INFO", "POST", "/analyze", 200),
        ("WARNING", "POST", "/analyze", 400),
        ("INFO", "POST", "/analyze", 200),
    ]
    assert all(isinstance(line["duration_ms"], float) and line["request_id"] for line in lines)
    assert lines[0]["image_id"] == image_id and lines[0]["width"] == 16 and lines[0]["type"] == "image/jpeg"
    assert [line.get("analysis") for line in lines[1:]] == ["new", None, "stored"]
    assert lines[2]["code"] == "invalid_image_id"
    assert KEY not in json.dumps(lines)


def test_request_path_cannot_forge_log_lines(make_app, capsys):
    client = make_app().test_client()
    capsys.readouterr()
    client.get("/a%0Afake_line%09x", headers={"X-API-Key": KEY})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and not any(line.startswith("fake_line") for line in lines)


def test_log_level_filters(make_app, capsys):
    client = make_app(LOG_LEVEL="warning").test_client()
    client.get("/health")
    assert capsys.readouterr().out == ""


# --- CORS ------------------------------------------------------------------------


def test_no_cors_headers_by_default(client):
    response = client.get("/health", headers={"Origin": "https://example.com"})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_cors_with_an_origin_list(make_app):
    client = make_app(CORS_ORIGINS="https://app.example.com, https://admin.example.com").test_client()
    response = analyze(client, "mock_oily")
    allowed = client.post(
        "/analyze",
        headers={"X-API-Key": KEY, "Origin": "https://app.example.com"},
        json={"image_id": "mock_oily"},
    )
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "Origin" in allowed.headers["Vary"]
    assert "X-Request-ID" in allowed.headers["Access-Control-Expose-Headers"]
    other = client.get("/health", headers={"Origin": "https://evil.example.com"})
    assert "Access-Control-Allow-Origin" not in other.headers
    assert "Origin" in other.headers["Vary"]
    assert "Access-Control-Allow-Origin" not in response.headers


def test_options_needs_a_key_without_cors(client):
    response = client.options(
        "/upload", headers={"Origin": "https://x.example", "Access-Control-Request-Method": "POST"}
    )
    assert_problem(response, 401, "unauthorized")


def test_cors_preflight_needs_no_key(make_app):
    client = make_app(CORS_ORIGINS="*").test_client()
    response = client.options(
        "/upload",
        headers={
            "Origin": "https://x.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "x-api-key",
        },
    )
    assert response.status_code == 204
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    assert "X-API-Key" in response.headers["Access-Control-Allow-Headers"]


# --- configuration ---------------------------------------------------------------


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MAX_UPLOAD_BYTES": "5MB"}, "MAX_UPLOAD_BYTES"),
        ({"MAX_UPLOAD_BYTES": "0"}, "MAX_UPLOAD_BYTES"),
        ({"MAX_UPLOAD_BYTES": "-1"}, "MAX_UPLOAD_BYTES"),
        ({"TRUSTED_PROXY_COUNT": "one"}, "TRUSTED_PROXY_COUNT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"UPLOAD_DIR": "/no/such/parent/uploads"}, "UPLOAD_DIR"),
        ({"UPLOAD_DIR": " "}, "UPLOAD_DIR"),
        ({"CLIENT_TIMEOUT": "0"}, "CLIENT_TIMEOUT"),
    ],
)
def test_bad_settings_stop_the_start_with_one_message(uploads, env, message):
    with pytest.raises(SystemExit) as stopped:
        create_app({"UPLOAD_DIR": str(uploads), "API_KEY": KEY, **env})
    assert str(stopped.value).startswith("Configuration error: " + message)


def test_missing_upload_folder_is_created(tmp_path):
    create_app({"UPLOAD_DIR": str(tmp_path / "fresh"), "API_KEY": KEY})
    assert (tmp_path / "fresh").is_dir()


def test_proxy_fix_uses_forwarded_client(make_app, capsys):
    client = make_app(TRUSTED_PROXY_COUNT="1").test_client()
    client.get("/health", headers={"X-Forwarded-For": "203.0.113.9"})
    assert "client=203.0.113.9" in capsys.readouterr().out


def test_env_file_is_read_but_environment_wins(tmp_path, monkeypatch):
    (tmp_path / ".env").write_text(
        f"UPLOAD_DIR={tmp_path / 'from_dotenv'}\nAPI_KEY=from-dotenv\nMAX_UPLOAD_BYTES=1234\n"
    )
    environment = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "UPLOAD_DIR")}
    environment["MAX_UPLOAD_BYTES"] = "4321"
    monkeypatch.setattr(os, "environ", environment)  # load_dotenv writes here, not to the real one
    monkeypatch.setattr(
        app_module, "load_dotenv", lambda: __import__("dotenv").load_dotenv(tmp_path / ".env")
    )
    app = create_app()
    assert app.config["UPLOAD_DIR"] == tmp_path / "from_dotenv"
    assert app.config["MAX_UPLOAD_BYTES"] == 4321
    assert app.config["API_KEYS"] == (b"from-dotenv",)


# --- against a real gunicorn server -----------------------------------------------


@pytest.fixture
def record(capsys):
    """Print a measured figure in the test run's output, for the closing notes."""

    def write(name, value):
        with capsys.disabled():
            print(f"\n[figure] {name}: {value}")

    return write


class Server:
    """gunicorn started as the Procfile starts it, on a free loopback port."""

    def __init__(self, folder, env=None, args=()):
        environment = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "PORT", "WEB_CONCURRENCY")}
        environment.update({"UPLOAD_DIR": str(folder), **(env or {})})
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            "gunicorn.conf.py",
            "--bind",
            "127.0.0.1:0",
            *args,
        ]
        self.log = tempfile.TemporaryFile("w+")
        self.process = subprocess.Popen(command, cwd=HERE, env=environment, stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            self.log.seek(0)
            match = re.search(r"Listening at: http://127\.0\.0\.1:(\d+)", self.log.read())
            if match:
                self.port = int(match[1])
                self.url = f"http://127.0.0.1:{self.port}"
                break
            assert self.process.poll() is None, "gunicorn exited"
            time.sleep(0.05)
        else:
            raise AssertionError("gunicorn did not start")
        while requests.get(self.url + "/health", timeout=5).status_code != 200:
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.stop()

    def stop(self):
        """Stop the server, and fail the test if it answered any request with a 500."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.seek(0)
        log = self.log.read()
        self.log.close()
        assert "status=500" not in log and "unhandled error" not in log, log[-2000:]


@pytest.fixture
def server(uploads):
    with Server(uploads, {"API_KEY": KEY}) as running:
        yield running


@pytest.fixture(scope="module")
def big_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big")
    files = {}
    for megabytes in (20, 60):
        path = folder / f"{megabytes}mb.jpg"
        with open(path, "wb") as file:
            file.write(make_jpeg())
            file.write(b"\0" * megabytes * 1_000_000)
        files[megabytes] = path
    return files


@pytest.mark.slow
@pytest.mark.parametrize("megabytes", [20, 60])
@pytest.mark.parametrize("expect", [True, False], ids=["expect-100", "no-expect"])
def test_curl_gets_413_for_huge_upload(server, uploads, big_files, megabytes, expect):
    command = [
        "curl",
        "-sS",
        "-H",
        f"X-API-Key: {KEY}",
        "-F",
        f"file=@{big_files[megabytes]}",
        "-w",
        "\n%{http_code}",
        server.url + "/upload",
    ]
    if not expect:
        command[2:2] = ["-H", "Expect:"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    body, status = result.stdout.rsplit("\n", 1)
    assert status == "413"
    assert json.loads(body)["code"] == "file_too_large"
    assert stored_files(uploads) == []


@pytest.mark.slow
@pytest.mark.parametrize("megabytes", [20, 60])
def test_requests_gets_413_for_huge_upload(server, uploads, big_files, megabytes):
    with open(big_files[megabytes], "rb") as file:
        response = requests.post(
            server.url + "/upload", headers={"X-API-Key": KEY}, files={"file": file}, timeout=60
        )
    assert response.status_code == 413
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "file_too_large"
    assert stored_files(uploads) == []


@pytest.mark.slow
def test_gunicorn_end_to_end(server, uploads):
    session = requests.Session()
    session.headers["X-API-Key"] = KEY
    data = make_jpeg(size=5_242_880)
    response = session.post(
        server.url + "/api/v1/upload", files={"file": ("a.jpg", data, "image/jpeg")}, timeout=30
    )
    assert response.status_code == 201, response.text
    image_id = response.json()["image_id"]
    bodies = {
        session.post(server.url + "/analyze", json={"image_id": image_id}, timeout=10).content
        for _ in range(20)
    }
    assert len(bodies) == 1
    chunked = session.post(
        server.url + "/upload",
        data=iter([b"x"]),
        timeout=10,
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    assert chunked.status_code == 400 and chunked.json()["code"] == "invalid_multipart"
    assert (uploads / f"{image_id}.jpg").read_bytes() == data


@pytest.mark.slow
def test_chunked_upload_over_the_limit_gets_413(server, uploads):
    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n' + make_jpeg()
        for _ in range(8):
            yield b"\0" * 1_000_000

    response = requests.post(
        server.url + "/upload",
        data=chunks(),
        timeout=30,
        headers={"X-API-Key": KEY, "Content-Type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 413
    assert stored_files(uploads) == []


@pytest.mark.slow
@pytest.mark.parametrize("preload", [True, False], ids=["procfile", "workers-start-together"])
def test_workers_agree_on_the_generated_key(uploads, preload):
    args = ["--workers", "4"] + (
        [] if preload else ["--config", os.devnull, "--worker-class", "gthread", "app:create_app()"]
    )
    with Server(uploads, args=args) as running:
        key = (uploads / storage.KEY_FILE).read_text()
        statuses = set()
        for _ in range(40):  # new connections, spread over the workers
            response = requests.post(
                running.url + "/analyze",
                headers={"X-API-Key": key, "Connection": "close"},
                json={"image_id": "mock_oily"},
                timeout=10,
            )
            statuses.add(response.status_code)
        assert statuses == {200}


@pytest.mark.slow
def test_stalled_upload_is_cut_off_and_discarded(uploads):
    with Server(uploads, {"API_KEY": KEY, "CLIENT_TIMEOUT": "1"}) as running:
        body = multipart([(FILE_HEADERS, make_png())])
        stalled = socket.create_connection(("127.0.0.1", running.port), timeout=10)
        stalled.sendall(
            b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Length: %d\r\n"
            b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n%s"
            % (KEY.encode(), len(body), body[:50])
        )
        started = time.monotonic()
        assert analyze_over_http(running, "mock_oily").status_code == 200  # others are served meanwhile
        answer = b""
        while chunk := stalled.recv(65536):  # gunicorn closes the connection after a 408
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")
        assert b'"code":"request_timeout"' in answer
        assert time.monotonic() - started < 5
        stalled.close()
        assert stored_files(uploads) == []


@pytest.mark.slow
def test_slow_and_silent_clients_do_not_hold_up_others(uploads, record):
    """Trickling uploads, silent connections and dribbled headers; a good client is still served."""
    body = multipart([(FILE_HEADERS, make_jpeg(size=1_000_000))])
    head = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Length: %d\r\n"
        b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n" % (KEY.encode(), len(body))
    )
    with Server(uploads, {"API_KEY": KEY}) as running:  # the Procfile's settings: 2 workers
        connect = functools.partial(socket.create_connection, ("127.0.0.1", running.port), timeout=10)
        silent = [connect() for _ in range(20)]
        trickling = [connect() for _ in range(20)]
        dribbling = [connect() for _ in range(10)]
        for client in trickling:
            client.sendall(head)
        stop = threading.Event()

        def misbehave():
            sent = 0
            while not stop.wait(0.5):  # 4 bytes a second each
                for client in trickling:
                    client.sendall(body[sent : sent + 2])
                for client in dribbling:
                    client.sendall(head[sent : sent + 2])
                sent += 2

        misbehaving = threading.Thread(target=misbehave)
        misbehaving.start()
        slowest = 0
        try:
            session = requests.Session()
            session.headers["X-API-Key"] = KEY
            deadline = time.monotonic() + 12  # past gunicorn's 5 s wait on silent connections
            while time.monotonic() < deadline:
                started = time.monotonic()
                # A new connection each time, so both workers are tried.
                close = {"Connection": "close"}
                assert session.get(running.url + "/health", headers=close, timeout=5).status_code == 200
                created = session.post(
                    running.url + "/upload", files={"file": make_png()}, headers=close, timeout=5
                )
                assert created.status_code == 201
                image_id = created.json()["image_id"]
                analyzed = session.post(
                    running.url + "/analyze", json={"image_id": image_id}, headers=close, timeout=5
                )
                assert analyzed.status_code == 200
                slowest = max(slowest, time.monotonic() - started)
        finally:
            stop.set()
            misbehaving.join()
            for client in silent + trickling + dribbling:
                client.close()
        record("slow clients: slowest health+upload+analyze round", f"{slowest:.3f} s")
        assert slowest < 2
        assert running.process.poll() is None


def analyze_over_http(server, image_id):
    return requests.post(
        server.url + "/analyze", headers={"X-API-Key": KEY}, json={"image_id": image_id}, timeout=10
    )


# --- faults against a real gunicorn server ------------------------------------------


def worker_pids(server):
    children = Path(f"/proc/{server.process.pid}/task/{server.process.pid}/children").read_text()
    return [int(pid) for pid in children.split()]


def unique_jpeg(size):
    return make_jpeg(size=size, noise=os.urandom(16).hex().encode())


def no_temp_files(folder):
    return not [p for p in Path(folder).iterdir() if p.name.startswith(storage.TEMP_PREFIX)]


def image_files(folder):
    return {p.stem: p for p in Path(folder).iterdir() if p.suffix in (".jpg", ".png")}


def wait_healthy(server, within=10):
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if requests.get(server.url + "/health", timeout=2).status_code == 200:
                return True
        except requests.RequestException:
            pass
        time.sleep(0.05)
    return False


@pytest.mark.slow
def test_killed_workers_never_lose_or_corrupt_uploads(uploads, record):
    running = Server(uploads, {"API_KEY": KEY})  # the Procfile's settings: 2 workers
    sent, acknowledged, stop = {}, {}, threading.Event()

    def client(seed):
        session = requests.Session()
        session.headers["X-API-Key"] = KEY
        sizes = [1_000_000, 2_500_000, 5_242_880]
        for n in range(10_000):
            if stop.is_set():
                return
            data = unique_jpeg(sizes[(seed + n) % len(sizes)])
            digest = hashlib.sha256(data).hexdigest()
            sent[digest] = len(data)
            try:
                response = session.post(running.url + "/upload", files={"file": ("a.jpg", data)}, timeout=30)
            except requests.RequestException:
                continue  # the worker died mid-request: the client never learned an id
            if response.status_code == 201:
                acknowledged[response.json()["image_id"]] = digest

    kills = 0
    try:
        with ThreadPoolExecutor(6) as pool:
            futures = [pool.submit(client, seed) for seed in range(6)]
            for _ in range(20):
                time.sleep(0.4)
                pids = worker_pids(running)
                os.kill(pids[kills % len(pids)], signal.SIGKILL)
                kills += 1
                assert wait_healthy(running), "the service stopped answering after a kill"
            stop.set()
            for future in futures:
                future.result()
    finally:
        stop.set()
        running.stop()

    assert kills >= 20 and len(acknowledged) >= 20
    files = image_files(uploads)
    for image_id, digest in acknowledged.items():
        assert hashlib.sha256(files[image_id].read_bytes()).hexdigest() == digest
    # A worker killed after the rename but before its 201 left leaves a complete file whose id
    # nobody learned; it must still be exactly one of the uploads sent, never a partial one.
    for image_id in set(files) - set(acknowledged):
        assert hashlib.sha256(files[image_id].read_bytes()).hexdigest() in sent
    Server(uploads, {"API_KEY": KEY}).stop()  # the next start removes what the kills left
    assert no_temp_files(uploads)
    record(
        "worker kills",
        f"{kills} SIGKILLs, {len(sent)} uploads sent, {len(acknowledged)} acknowledged and byte-identical,"
        f" {len(set(files) - set(acknowledged))} complete but unacknowledged",
    )


@pytest.mark.slow
def test_concurrent_retries_across_workers_store_one_image(uploads, record):
    data = unique_jpeg(2_000_000)
    headers = {"X-API-Key": KEY, "Idempotency-Key": "photo-1", "Connection": "close"}
    with Server(uploads, {"API_KEY": KEY, "WEB_CONCURRENCY": "3"}) as running:
        barrier = threading.Barrier(12)

        def retry(_):
            barrier.wait()
            return requests.post(running.url + "/upload", headers=headers, files={"file": data}, timeout=30)

        with ThreadPoolExecutor(12) as pool:
            responses = list(pool.map(retry, range(12)))
        later = requests.post(running.url + "/upload", headers=headers, files={"file": data}, timeout=30)
    statuses = Counter(response.status_code for response in responses)
    assert set(statuses) <= {201, 409} and statuses[201] >= 1
    for response in responses:
        if response.status_code == 409:
            assert response.json()["code"] == "idempotency_conflict"
    image_ids = {response.json()["image_id"] for response in responses if response.status_code == 201}
    assert len(image_ids) == 1
    assert later.status_code == 201 and later.headers["Idempotent-Replayed"] == "true"
    assert {later.json()["image_id"]} == image_ids
    assert image_names(uploads) == [f"{image_ids.pop()}.jpg"]
    record("12 simultaneous retries over 3 workers", dict(statuses))


@pytest.mark.slow
def test_deletes_racing_analyses_across_workers_leave_nothing_behind(uploads):
    with Server(uploads, {"API_KEY": KEY, "WEB_CONCURRENCY": "3"}) as running:
        session = requests.Session()
        session.headers["X-API-Key"] = KEY
        image_ids = [
            session.post(running.url + "/upload", files={"file": unique_jpeg(5_000)}, timeout=10).json()[
                "image_id"
            ]
            for _ in range(30)
        ]
        close = {"X-API-Key": KEY, "Connection": "close"}

        def analyze_(image_id):
            return requests.post(
                running.url + "/analyze", json={"image_id": image_id}, headers=close, timeout=10
            )

        def delete_(image_id):
            return requests.delete(f"{running.url}/images/{image_id}", headers=close, timeout=10)

        with ThreadPoolExecutor(16) as pool:
            analyses = [pool.submit(analyze_, image_id) for image_id in image_ids for _ in range(3)]
            deletes = [pool.submit(delete_, image_id) for image_id in image_ids]
            assert {future.result().status_code for future in deletes} == {204}
            assert {future.result().status_code for future in analyses} <= {200, 404}
    assert stored_files(uploads) == []  # no analysis outlived its image


@pytest.mark.slow
def test_server_killed_outright_keeps_everything_acknowledged(uploads):
    running = Server(uploads, {"API_KEY": KEY})
    session = requests.Session()
    session.headers["X-API-Key"] = KEY
    results = {}
    for _ in range(20):
        data = unique_jpeg(200_000)
        image_id = session.post(running.url + "/upload", files={"file": ("a.jpg", data)}, timeout=10).json()[
            "image_id"
        ]
        results[image_id] = (
            data,
            session.post(running.url + "/analyze", json={"image_id": image_id}, timeout=10).content,
        )
    for pid in [running.process.pid, *worker_pids(running)]:
        os.kill(pid, signal.SIGKILL)
    running.process.wait()
    with Server(uploads, {"API_KEY": KEY}) as restarted:
        for image_id, (data, analysis_body) in results.items():
            assert (uploads / f"{image_id}.jpg").read_bytes() == data
            response = session.post(restarted.url + "/analyze", json={"image_id": image_id}, timeout=10)
            assert response.content == analysis_body


@pytest.mark.slow
def test_concurrent_uploads_and_analyses_across_workers(uploads):
    with Server(uploads, {"API_KEY": KEY, "WEB_CONCURRENCY": "3"}) as running:
        images = [unique_jpeg(50_000) for _ in range(64)]

        def send(data):
            response = requests.post(
                running.url + "/upload",
                headers={"X-API-Key": KEY},
                files={"file": ("a.jpg", data)},
                timeout=30,
            )
            return response.status_code, response.json()["image_id"]

        with ThreadPoolExecutor(64) as pool:
            uploaded = list(pool.map(send, images))
        assert {status for status, _ in uploaded} == {201}
        assert len({image_id for _, image_id in uploaded}) == 64
        for (_, image_id), data in zip(uploaded, images):
            assert (uploads / f"{image_id}.jpg").read_bytes() == data

        target = uploaded[0][1]
        with ThreadPoolExecutor(50) as pool:
            bodies = list(pool.map(lambda _: analyze_over_http(running, target).content, range(200)))
        assert len(set(bodies)) == 1
        assert (uploads / f"{target}.json").read_bytes() == bodies[0]
        assert json.loads(bodies[0])["image_id"] == target
        assert no_temp_files(uploads)


def raw_request(server, data, shut_write=False):
    """Send raw bytes to the server and return its whole answer."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
        connection.sendall(data)
        if shut_write:
            connection.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b'"code"' in answer:
                break
        return answer


@pytest.mark.slow
@pytest.mark.parametrize(
    "body, shut_write, code",
    [
        (b"zz\r\nabc\r\n0\r\n\r\n", False, "invalid_body"),
        (b"5\r\nabcdefgh\r\n0\r\n\r\n", False, "invalid_body"),
        (b"100\r\nabc", True, "incomplete_body"),
    ],
    ids=["bad chunk size", "missing chunk terminator", "cut off"],
)
def test_broken_chunked_bodies_are_4xx(server, uploads, body, shut_write, code):
    head = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n" % KEY.encode()
    )
    answer = raw_request(server, head + body, shut_write)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"code":"%s"' % code.encode() in answer
    assert stored_files(uploads) == []


# --- OpenAPI document and interactive docs ------------------------------------------


def test_openapi_document_is_served_and_covers_every_route(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.get_json()
    assert document == json.loads((HERE / "openapi.json").read_text())
    assert document["openapi"].startswith("3.1")
    documented = {(path, method) for path, item in document["paths"].items() for method in item}
    for rule in client.application.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            if path != "/docs/{asset}":
                assert (path, method.lower()) in documented or ("$ref" in document["paths"].get(path, {}))


def test_openapi_document_lists_every_error_code_the_readme_does():
    codes = set(re.findall(r"^\| \d{3} \| `(\w+)` \|", (HERE / "README.md").read_text(), re.M))
    assert codes and codes <= set(re.findall(r'"(\w+)"', (HERE / "openapi.json").read_text()))


def test_openapi_does_not_promise_refusals_the_service_does_not_make():
    """Found by schemathesis: insane request ids are replaced, and ?image_id= is ignored when there is a body."""
    components = json.loads((HERE / "openapi.json").read_text())["components"]["parameters"]
    assert components["RequestId"]["schema"] == {"type": "string"}
    assert components["ImageIdQuery"]["schema"] == {"type": "string"}


def test_query_image_id_is_ignored_when_there_is_a_body(client):
    response = client.post(
        "/analyze?image_id=../x", headers={"X-API-Key": KEY}, json={"image_id": "mock_dry"}
    )
    assert response.status_code == 200 and response.get_json()["skin_type"] == "Dry"


@pytest.mark.parametrize("path", ["/docs", "/docs/swagger-ui.css", "/docs/swagger-ui-bundle.js"])
def test_docs_are_served_locally_without_a_key(client, path):
    response = client.get(path)
    assert response.status_code == 200
    if path == "/docs":
        assert b"/docs/swagger-ui-bundle.js" in response.data and b"/openapi.json" in response.data
        assert b"http" not in response.data  # nothing from a CDN


@pytest.mark.parametrize("asset", ["index.html", "..%2Fapp.py", "swagger-initializer.js", "app.py"])
def test_docs_serve_nothing_else(client, asset):
    assert client.get(f"/docs/{asset}").status_code in (401, 404)


@pytest.mark.slow
def test_docs_render_and_try_it_out_in_a_real_browser(server):
    if not shutil.which("chromium"):
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    flags = [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=flags)
        try:
            page = browser.new_page()
            page.goto(server.url + "/docs")
            page.wait_for_selector(".opblock", timeout=20_000)
            paths = set(page.locator(".opblock-summary-path").all_inner_texts())
            assert {"/health", "/upload", "/analyze", "/images/{image_id}", "/api/v1/analyze"} <= paths
            health = page.locator("#operations-Health-get_health")
            health.locator(".opblock-summary").click()
            health.locator("button.try-out__btn").click()
            health.locator("button.execute").click()
            status = health.locator(".live-responses-table tbody .response-col_status").first
            status.wait_for(timeout=10_000)
            assert status.inner_text().strip() == "200"
        finally:
            browser.close()


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that really fills up and really turns read-only."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)]).returncode
    ):
        pytest.skip("mounting a tmpfs needs root; test_storage_failure_leaves_nothing_behind covers ENOSPC")
    (mount / "uploads").mkdir()
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def health_status(server):
    return requests.get(server.url + "/health", timeout=10).status_code


@pytest.mark.slow
def test_full_read_only_and_deleted_folders_fail_cleanly_and_recover(small_disk):
    folder = small_disk / "uploads"
    with Server(folder, {"API_KEY": KEY, "MAX_UPLOAD_BYTES": "1000000"}) as running:
        session = requests.Session()
        session.headers["X-API-Key"] = KEY

        def send():
            return session.post(
                running.url + "/upload", files={"file": ("a.jpg", unique_jpeg(900_000))}, timeout=30
            )

        statuses = [send().status_code for _ in range(6)]
        assert statuses[0] == 201 and statuses[-1] == 507, statuses
        assert send().json()["code"] == "storage_unavailable"
        assert health_status(running) == 503 and no_temp_files(folder)
        for path in image_files(folder).values():
            assert storage.inspect_image(path.read_bytes())  # every stored file is whole
        for path in list(image_files(folder).values())[:3]:
            path.unlink()
        assert health_status(running) == 200 and send().status_code == 201  # no restart needed

        subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
        try:
            assert send().status_code == 503 and health_status(running) == 503
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(small_disk)], check=True)
        assert health_status(running) == 200 and send().status_code == 201

        shutil.rmtree(folder)
        assert send().status_code == 503 and health_status(running) == 503
        folder.mkdir()
        assert health_status(running) == 200 and send().status_code == 201


@pytest.mark.slow
def test_sigterm_lets_uploads_in_flight_finish(uploads):
    with Server(uploads, {"API_KEY": KEY}) as running:
        images = [unique_jpeg(2_000_000) for _ in range(3)]
        connections = []
        for data in images:
            body = multipart([(b'Content-Disposition: form-data; name="file"; filename="a.jpg"', data)])
            head = (
                b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Length: %d\r\n"
                b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n" % (KEY.encode(), len(body))
            )
            connection = socket.create_connection(("127.0.0.1", running.port), timeout=20)
            connection.sendall(head + body[: len(body) // 2])
            connections.append((connection, body[len(body) // 2 :]))
        time.sleep(0.5)  # the workers are now reading these bodies
        running.process.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        answers = []
        for connection, rest in connections:
            connection.sendall(rest)
            answers.append(connection.recv(65536))
            connection.close()
        assert all(answer.startswith(b"HTTP/1.1 201") for answer in answers), [a[:60] for a in answers]
        assert running.process.wait(timeout=25) == 0
        stored = {hashlib.sha256(p.read_bytes()).digest() for p in image_files(uploads).values()}
        assert stored == {hashlib.sha256(data).digest() for data in images}
        assert no_temp_files(uploads)


def worker_rss_kib(server):
    total = 0
    for pid in worker_pids(server):
        status = Path(f"/proc/{pid}/status").read_text()
        total += int(re.search(r"VmRSS:\s+(\d+)", status)[1])
    return total


def oversized_requests():
    head = b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\n" % KEY.encode()
    multipart_type = b"Content-Type: multipart/form-data; boundary=b0undary\r\n"
    for megabytes in (6, 20, 60, 200):
        yield (
            f"{megabytes} MB body",
            head + multipart_type + b"Content-Length: %d\r\n\r\n" % (megabytes * 10**6),
            413,
        )
    many_parts = (
        b'--b0undary\r\nContent-Disposition: form-data; name="f"\r\n\r\nv\r\n' * 10_000 + b"--b0undary--\r\n"
    )
    yield (
        "10,000 parts",
        head + multipart_type + b"Content-Length: %d\r\n\r\n" % len(many_parts) + many_parts,
        400,
    )
    never_closed = (
        b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n' + b"x" * 100_000
    )
    yield (
        "boundary never closes",
        head + multipart_type + b"Content-Length: %d\r\n\r\n" % len(never_closed) + never_closed,
        400,
    )
    text_field = b'--b0undary\r\nContent-Disposition: form-data; name="file"\r\n\r\nhello\r\n--b0undary--\r\n'
    yield (
        "file is a text field",
        head + multipart_type + b"Content-Length: %d\r\n\r\n" % len(text_field) + text_field,
        400,
    )
    yield "1 MB header (gunicorn refuses it itself)", head + b"X-Junk: " + b"j" * 1_000_000 + b"\r\n\r\n", 431


@pytest.mark.slow
def test_oversized_and_malformed_requests_are_refused_cheaply(server, uploads, record):
    while len(worker_pids(server)) < 2 or not all(health_status(server) == 200 for _ in range(10)):
        time.sleep(0.1)  # both workers up and warm before the baseline
    baseline = worker_rss_kib(server)
    for label, request_bytes, status in [*oversized_requests(), *oversized_requests()]:
        try:
            answer = raw_request(server, request_bytes)
        except (BrokenPipeError, ConnectionResetError):
            answer = b""  # refused and closed while we were still sending: allowed for abuse
        assert answer == b"" or answer.startswith(b"HTTP/1.1 %d" % status), (label, answer[:100])
        assert health_status(server) == 200, label
    growth = worker_rss_kib(server) - baseline
    assert growth < 8 * 1024  # two workers, two passes: a few MB at most
    assert stored_files(uploads) == []
    peaks = [
        re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1]
        for pid in worker_pids(server)
    ]
    record("oversized requests", f"RSS growth {growth} KiB over both workers; peak RSS {peaks} KiB")
