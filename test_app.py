"""Tests of the HTTP contract, built from the app factory with a temporary uploads folder."""

import builtins
import io
import json
import os
import re
import shutil
import socket
import struct
import urllib.parse
import uuid
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from werkzeug.test import EnvironBuilder, run_wsgi_app

import analysis
import app as app_module
import images
import storage
from app import create_app
from conftest import (
    FILE_HEADERS,
    HERE,
    ICC,
    KEY,
    LOCATING_SEGMENTS,
    MINIMAL_EXIF,
    OTHER_KEY,
    REAL_ID,
    UUID4,
    analyze,
    assert_problem,
    delete,
    exif_segment,
    exif_tiff,
    jpeg_segment,
    make_jpeg,
    make_png,
    multipart,
    png_chunk,
    stored_image,
    unique_jpeg,
    upload,
    upload_once,
)

PINNED_MOCK_OILY = {
    "image_id": "mock_oily",
    "skin_type": "Oily",
    "issues": ["Hyperpigmentation"],
    "confidence": 0.82,
}


PINNED_REAL_ID = {"image_id": REAL_ID, "skin_type": "Dry", "issues": ["Dehydration"], "confidence": 0.8}


@pytest.mark.parametrize("path", ["/health", "/api/v1/health"])
def test_health_needs_no_key(client, path):
    response = client.get(path)
    assert response.status_code == 200
    assert response.get_json() == {"status": "healthy"}


@pytest.mark.folder
def test_health_reports_missing_folder(client, uploads):
    shutil.rmtree(uploads)
    assert_problem(client.get("/health"), 503, "storage_unavailable")


@pytest.mark.folder
def test_health_reports_a_disk_too_full_for_one_more_upload(client, monkeypatch):
    full = os.statvfs_result((4096, 4096, 1000, 10, 10, 1000, 10, 10, 0, 255))
    monkeypatch.setattr(storage.os, "statvfs", lambda path: full)
    assert "full" in assert_problem(client.get("/health"), 503, "storage_unavailable")["detail"]


@pytest.mark.parametrize("prefix", ["", "/api/v1"])
@pytest.mark.parametrize(
    "data, content_type, extension, width, height",
    [
        (make_jpeg(640, 480), "image/jpeg", ".jpg", 640, 480),
        (make_png(300, 200), "image/png", ".png", 300, 200),
    ],
)
def test_upload_stores_image(client, store, prefix, data, content_type, extension, width, height):
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
    assert store.image(image_id) == data
    assert store.names() == [f"{image_id}{extension}"]


def test_upload_ignores_client_filename_and_content_type(client, store):
    response = upload(client, make_jpeg(), filename="../../evil.png", content_type="text/html")
    assert response.status_code == 201
    assert response.get_json()["content_type"] == "image/jpeg"
    assert store.names() == [response.get_json()["image_id"] + ".jpg"]


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


def test_upload_accepts_exactly_the_limit(client):
    response = upload(client, make_jpeg(size=5_242_880))
    assert response.status_code == 201
    assert response.get_json()["size_bytes"] == 5_242_880


def test_upload_refuses_one_byte_over_the_limit(client, store):
    assert_problem(upload(client, make_jpeg(size=5_242_881)), 413, "file_too_large")
    assert store.names() == []


def test_form_data_around_the_file_may_add_64_kib(make_app):
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


def test_upload_limit_is_configurable(make_app):
    client = make_app(MAX_UPLOAD_BYTES="2000").test_client()
    assert upload(client, make_jpeg(size=2000)).status_code == 201
    assert_problem(upload(client, make_jpeg(size=2001)), 413, "file_too_large")


def test_upload_refuses_huge_body_before_reading_it(client, store):
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
    assert store.names() == []


BAD_UPLOADS = {
    "no file field": ({"other": (make_png(), "a.png")}, 400, "missing_file"),
    "file is a text field": ({"file": "just text"}, 400, "unsupported_type"),
    "empty file": ({"file": (b"", "a.png")}, 400, "empty_file"),
    "text sent as png": (
        {"file": (b"hello, world", "a.png", "image/png")},
        400,
        "unsupported_type",
    ),
    "html renamed png": (
        {"file": (b"<html><script>x</script></html>", "a.png")},
        400,
        "unsupported_type",
    ),
    "svg renamed png": (
        {"file": (b'<svg xmlns="http://www.w3.org/2000/svg"/>', "a.png")},
        400,
        "unsupported_type",
    ),
    "gif": ({"file": (b"GIF89a\x01\x00\x01\x00\x00\x00\x00;", "a.gif")}, 400, "unsupported_type"),
    "png signature only": ({"file": (images.PNG_SIGNATURE, "a.png")}, 400, "invalid_image"),
    "png truncated": ({"file": (make_png()[:60], "a.png")}, 400, "invalid_image"),
    "png bad header checksum": (
        {"file": ((make_png()[:29] + b"\0\0\0\0" + make_png()[33:]), "a.png")},
        400,
        "invalid_image",
    ),
    "png zero width": ({"file": (make_png(0, 5), "a.png")}, 400, "invalid_image"),
    "png over 100 megapixels": (
        {"file": (make_png(20000, 5001), "a.png")},
        400,
        "image_too_large",
    ),
    "jpeg signature only": ({"file": (b"\xff\xd8\xff", "a.jpg")}, 400, "invalid_image"),
    "jpeg truncated in header": ({"file": (make_jpeg()[:30], "a.jpg")}, 400, "invalid_image"),
    "jpeg truncated in scan": ({"file": (make_jpeg()[:-2], "a.jpg")}, 400, "invalid_image"),
    "jpeg without frame header": (
        {
            "file": (
                (b"\xff\xd8" + jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\xff\xd9"),
                "a.jpg",
            )
        },
        400,
        "invalid_image",
    ),
    "jpeg declaring 60000x60000": (
        {
            "file": (
                (make_jpeg().replace(struct.pack(">HH", 8, 16), struct.pack(">HH", 60000, 60000))),
                "a.jpg",
            )
        },
        400,
        "image_too_large",
    ),
}


@pytest.mark.parametrize("form, status, code", BAD_UPLOADS.values(), ids=BAD_UPLOADS.keys())
def test_bad_uploads_are_refused_and_nothing_is_stored(client, store, form, status, code):
    files = {
        name: (io.BytesIO(part[0]), *part[1:]) if isinstance(part, tuple) else part
        for name, part in form.items()
    }
    response = client.post(
        "/upload", headers={"X-API-Key": KEY}, data=files, content_type="multipart/form-data"
    )
    body = assert_problem(response, status, code)
    if code == "unsupported_type":
        assert "JPEG" in body["detail"] and "PNG" in body["detail"]
    assert store.names() == []


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
def test_malformed_upload_requests(client, store, content_type, body, code):
    response = client.post("/upload", headers={"X-API-Key": KEY, "Content-Type": content_type}, data=body)
    assert_problem(response, 400, code)
    assert store.names() == []


def test_concurrent_uploads_get_distinct_ids_and_intact_files(make_app, store):
    app = make_app()
    photos = [make_jpeg(8 * (i + 1), 8, size=20_000 + i) for i in range(32)]

    def send(data):
        return upload(app.test_client(), data)

    with ThreadPoolExecutor(8) as pool:
        responses = list(pool.map(send, photos))
    ids = [r.get_json()["image_id"] for r in responses]
    assert all(r.status_code == 201 for r in responses)
    assert len(set(ids)) == len(photos)
    for image_id, data in zip(ids, photos):
        assert store.image(image_id) == data


def test_file_part_without_filename_is_accepted(client, store):
    body = multipart([(b'Content-Disposition: form-data; name="file"', make_jpeg())])
    response = client.post(
        "/upload",
        headers={"X-API-Key": KEY, "Content-Type": "multipart/form-data; boundary=b0undary"},
        data=body,
    )
    assert response.status_code == 201
    assert store.names() == [response.get_json()["image_id"] + ".jpg"]


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


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_upload_drops_location_metadata_but_keeps_orientation(client, store, order):
    sent = make_jpeg(segments=[exif_segment(exif_tiff(order)), ICC, *LOCATING_SEGMENTS])
    stored = stored_image(store, upload(client, sent))
    assert stored == make_jpeg(segments=[exif_segment(MINIMAL_EXIF[order]), ICC])


@pytest.mark.parametrize("orientation", [1, None], ids=["upright", "absent"])
def test_no_orientation_segment_when_there_is_nothing_to_keep(client, store, orientation):
    sent = make_jpeg(segments=[exif_segment(exif_tiff(orientation=orientation))])
    assert stored_image(store, upload(client, sent)) == make_jpeg()


@pytest.mark.parametrize(
    "data, content_type",
    [(make_jpeg(segments=[ICC]), "image/jpeg"), (make_png(), "image/png")],
    ids=["jpeg", "png"],
)
def test_images_without_metadata_are_stored_as_sent(client, store, data, content_type):
    assert stored_image(store, upload(client, data, content_type=content_type)) == data


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
def test_malformed_exif_is_stored_with_no_metadata_at_all(client, store, order, make_tiff):
    sent = make_jpeg(segments=[exif_segment(make_tiff(order)), *LOCATING_SEGMENTS])
    assert stored_image(store, upload(client, sent)) == make_jpeg()


def test_what_follows_the_image_is_dropped(client, store):
    """A second image with its own Exif (MPO, gain maps) or a motion photo's video after EOI."""
    mpf = jpeg_segment(0xE2, b"MPF\x00II*\x00\x08\x00\x00\x00")
    second = make_jpeg(segments=[exif_segment(exif_tiff())])
    sent = make_jpeg(segments=[ICC, mpf]) + second + b"ftypmp42 ... GPS 52.52N"
    assert stored_image(store, upload(client, sent)) == make_jpeg(segments=[ICC])


def test_metadata_between_progressive_scans_is_dropped(client, store):
    plain = make_jpeg()
    first_scan_end = plain.index(b"\xff\xd9")
    # A second scan, preceded by a table (kept) and by metadata segments (dropped).
    table = jpeg_segment(0xC4, b"\x10\x01" + b"\x00" * 15 + b"\xff")  # 0xFF inside a table is no marker
    scan = jpeg_segment(0xDA, b"\x01\x01\x00\x00\x3f\x00") + b"\x12\xff\x00\x34\xff\xd0\x56"
    tail = b"\xff\xd9"
    sent = plain[:first_scan_end] + exif_segment(exif_tiff()) + table + LOCATING_SEGMENTS[2] + scan + tail
    stored = stored_image(store, upload(client, sent))
    assert stored == plain[:first_scan_end] + table + scan + tail


def test_png_loses_what_follows_iend(client, store):
    sent = make_png() + b"PK\x03\x04 a zip with a location.txt"
    assert stored_image(store, upload(client, sent, content_type="image/png")) == make_png()


@pytest.mark.parametrize("order", ["<", ">"], ids=["little-endian", "big-endian"])
def test_png_text_and_exif_chunks_are_dropped(client, store, order):
    gamma = png_chunk(b"gAMA", struct.pack(">I", 45455))
    text = [
        png_chunk(b"tEXt", b"Comment\x00GPS 52.52 13.40"),
        png_chunk(b"zTXt", b"Location\x00\x00" + zlib.compress(b"Berlin")),
        png_chunk(
            b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00<exif:GPSLatitude>52,31N</exif:GPSLatitude>"
        ),
    ]
    sent = make_png(extra_chunks=[png_chunk(b"eXIf", exif_tiff(order)), *text, gamma])
    stored = stored_image(store, upload(client, sent, content_type="image/png"))
    assert stored == make_png(extra_chunks=[png_chunk(b"eXIf", MINIMAL_EXIF[order]), gamma])


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


def test_analyze_is_stored_and_survives_a_logic_change(client, store, image_id, monkeypatch):
    first = analyze(client, image_id).data
    assert store.analysis(image_id) == first
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


def test_stored_analysis_shortcut_answers_exactly_as_flask(make_app, capsys, monkeypatch):
    app = make_app()
    client = app.test_client()
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    analyze(client, image_id)
    admission = app.wsgi_app
    assert isinstance(admission.app, app_module.StoredAnalysisShortcut)
    capsys.readouterr()
    fast = call_wsgi(admission, image_id)
    fast_log = capsys.readouterr().out
    monkeypatch.setattr(admission, "app", admission.app.flask)
    slow = call_wsgi(admission, image_id)
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


def test_images_and_analyses_persist_across_restart(make_app):
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
def test_fixture_ids_need_no_upload(client, store, fixture_id, skin_type):
    response = analyze(client, fixture_id)
    assert response.status_code == 200
    assert response.get_json()["skin_type"] == skin_type
    assert response.data == analyze(client, fixture_id).data
    assert store.names() == []


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


def refuse_hostile_id(client, bad_id):
    """Every way of naming ``bad_id`` is refused: analyze by body and by query, GET and DELETE."""
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


@pytest.mark.folder
@pytest.mark.parametrize("bad_id", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
def test_hostile_ids_are_refused_before_touching_the_filesystem(
    client, uploads, filesystem_calls, bad_id, store
):
    (uploads / f"{REAL_ID}.jpg").write_bytes(make_jpeg())
    filesystem_calls.clear()
    refuse_hostile_id(client, bad_id)
    assert filesystem_calls == []
    assert store.names() == [f"{REAL_ID}.jpg"]


@pytest.fixture
def registry_calls(client, monkeypatch):
    """Record every call the app makes to its registry."""
    registry, calls = client.application.extensions["registry"], []
    for name in ("check", "save_image", "image", "delete", "analysis", "stored_analysis", "purge"):

        def spy(*args, _real=getattr(registry, name), _name=name, **kwargs):
            calls.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(registry, name, spy)
    return calls


@pytest.mark.parametrize("bad_id", HOSTILE_IDS, ids=range(len(HOSTILE_IDS)))
def test_hostile_ids_never_reach_the_registry(client, registry_calls, bad_id):
    refuse_hostile_id(client, bad_id)
    assert registry_calls == []
    analyze(client, REAL_ID)  # the spy sees what does reach it
    assert "analysis" in registry_calls


@pytest.mark.folder
def test_unknown_id_touches_only_the_uploads_folder(client, uploads, filesystem_calls):
    filesystem_calls.clear()
    assert_problem(analyze(client, str(uuid.uuid4())), 404, "image_not_found")
    assert_problem(delete(client, str(uuid.uuid4())), 404, "image_not_found")
    assert filesystem_calls
    assert all(Path(path).parent == uploads for path in filesystem_calls if isinstance(path, str))


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


@pytest.mark.parametrize("prefix", ["", "/api/v1"])
def test_delete_removes_the_image_and_everything_about_it(make_app, store, prefix, capsys):
    client = make_app().test_client()
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    analyze(client, image_id)
    response = delete(client, image_id, path=prefix + "/images/")
    assert response.status_code == 204 and response.data == b"" and "Content-Type" not in response.headers
    assert store.names() == []
    assert_problem(client.get(f"/images/{image_id}", headers={"X-API-Key": KEY}), 404, "image_not_found")
    assert_problem(analyze(client, image_id), 404, "image_not_found")
    assert_problem(delete(client, image_id), 404, "image_not_found")
    assert f"method=DELETE path={prefix}/images/{image_id} status=204" in capsys.readouterr().out


@pytest.mark.parametrize("bad_id", ["nope", f"{REAL_ID}.jpg", REAL_ID.upper(), "..", "mock_oily"])
def test_delete_refuses_malformed_ids(client, store, image_id, bad_id):
    assert_problem(delete(client, bad_id), 400, "invalid_image_id")
    assert len(store.names()) == 1


def test_a_retry_gets_the_first_upload_back(client, store):
    data = unique_jpeg(20_000)
    first = upload_once(client, data, '"retry-1"')
    again = upload_once(client, data, "retry-1")  # the same key, quoted or not
    assert first.status_code == again.status_code == 201
    assert again.data == first.data and again.headers["Location"] == first.headers["Location"]
    assert again.headers["Idempotent-Replayed"] == "true" and "Idempotent-Replayed" not in first.headers
    assert store.image_names() == [first.get_json()["image_id"] + ".jpg"]


def test_idempotency_keys_belong_to_one_api_key(make_app, store):
    client = make_app(API_KEY=f"{KEY},{OTHER_KEY}").test_client()
    data = unique_jpeg(20_000)
    mine = upload_once(client, data, "k", key=KEY).get_json()["image_id"]
    theirs = upload_once(client, data, "k", key=OTHER_KEY).get_json()["image_id"]
    assert mine != theirs and len(store.image_names()) == 2


def test_the_same_key_with_other_bytes_is_refused(client, store):
    first = upload_once(client, unique_jpeg(20_000), "k").get_json()["image_id"]
    assert_problem(upload_once(client, unique_jpeg(20_000), "k"), 422, "idempotency_key_reused")
    assert store.image_names() == [first + ".jpg"]


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
def test_malformed_idempotency_keys_are_refused(client, store, value):
    response = upload(client, make_jpeg(), headers={"Idempotency-Key": value.encode().decode("latin-1")})
    assert_problem(response, 400, "invalid_idempotency_key")
    assert store.names() == []


def test_the_longest_key_is_accepted(client):
    assert upload_once(client, make_jpeg(), "k" * 255).status_code == 201


def test_without_a_key_every_upload_is_new(client, store):
    data = unique_jpeg(20_000)
    assert upload(client, data).get_json()["image_id"] != upload(client, data).get_json()["image_id"]
    assert len(store.image_names()) == 2 and not [name for name in store.names() if "idem" in name]


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
def test_protected_routes_need_a_valid_key(client, store, prefix, method, path, key):
    headers = {} if key is None else {"X-API-Key": key}
    response = client.open(
        prefix + path, method=method, headers=headers, data={"file": (io.BytesIO(make_jpeg()), "a.jpg")}
    )
    assert_problem(response, 401, "unauthorized")
    assert "X-API-Key" in response.headers["WWW-Authenticate"]
    assert store.names() == []


def test_an_empty_generated_key_stops_the_start(store):
    store.write_key(b"\n")
    with pytest.raises(SystemExit, match="no usable key"):
        create_app(store.env)


def test_unknown_routes_need_a_key_too(client):
    assert_problem(client.get("/nope"), 401, "unauthorized")


def test_several_keys_allow_rotation(make_app):
    client = make_app(API_KEY=f" {KEY} , {OTHER_KEY} ,").test_client()
    assert analyze(client, "mock_oily", key=KEY).status_code == 200
    assert analyze(client, "mock_oily", key=OTHER_KEY).status_code == 200
    assert analyze(client, "mock_oily", key="").status_code == 401


def test_generated_key_is_persisted_and_shared(store, capsys):
    first = create_app(store.env)
    key = store.key()
    assert len(key) >= 40
    out = capsys.readouterr().out
    assert store.key_location in out and key not in out
    second = create_app(store.env)
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


OPENAPI_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


def openapi_document():
    return json.loads((HERE / "openapi.json").read_text())


def test_openapi_document_is_served_and_covers_every_route(client):
    response = client.get("/openapi.json")
    assert response.status_code == 200 and response.mimetype == "application/json"
    document = response.get_json()
    assert document == openapi_document()
    assert document["openapi"].startswith("3.1")
    # Each route is documented once; its prefixes are the servers its path item (or the document) names.
    documented = {
        (server["url"].rstrip("/"), path, method)
        for path, item in document["paths"].items()
        for server in item.get("servers", document["servers"])
        for method in item.keys() & OPENAPI_METHODS
    }
    prefixes = sorted({prefix for prefix, _, _ in documented}, key=len, reverse=True)
    assert prefixes == ["/api/v1", ""]
    served = set()
    for rule in client.application.url_map.iter_rules():
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        if path != "/docs/{asset}":
            prefix = next(prefix for prefix in prefixes if path.startswith(prefix + "/"))
            methods = rule.methods - {"HEAD", "OPTIONS"}
            served |= {(prefix, path[len(prefix) :], method.lower()) for method in methods}
    assert served == documented


def test_openapi_operations_have_unique_ids():
    """Generated clients name a method after each operationId, and invent one (per prefix) without it."""
    ids = [
        operation.get("operationId")
        for item in openapi_document()["paths"].values()
        for method, operation in item.items()
        if method in OPENAPI_METHODS
    ]
    assert None not in ids and len(set(ids)) == len(ids), ids


def test_openapi_document_lists_every_error_code_the_readme_does():
    codes = set(re.findall(r"^\| \d{3} \| `(\w+)` \|", (HERE / "README.md").read_text(), re.M))
    assert codes and codes <= set(re.findall(r'"(\w+)"', (HERE / "openapi.json").read_text()))


def test_openapi_does_not_promise_refusals_the_service_does_not_make():
    """Found by schemathesis: insane request ids are replaced, and ?image_id= is ignored when there is a body."""
    document = openapi_document()
    parameters = document["components"]["parameters"]
    assert parameters["RequestId"]["schema"] == {"type": "string"}
    # Declared with its pattern, ?image_id= would make a request with a body and a malformed
    # ?image_id= invalid by the document, yet the service answers it; so the operation describes it.
    analyze = document["paths"]["/analyze"]["post"]
    declared = [parameters[parameter["$ref"].rsplit("/", 1)[1]] for parameter in analyze["parameters"]]
    assert [parameter["in"] for parameter in declared] == ["header"]
    assert "`?image_id=`" in analyze["description"]


def test_openapi_analyze_requires_the_body_the_service_requires(client):
    """Found by schemathesis: with neither a body nor ?image_id=, a request was valid by the document."""
    assert openapi_document()["paths"]["/analyze"]["post"]["requestBody"]["required"] is True
    assert_problem(client.post("/analyze", headers={"X-API-Key": KEY}), 400, "invalid_request")


def test_query_image_id_is_ignored_when_there_is_a_body(client):
    response = client.post(
        "/analyze?image_id=../x", headers={"X-API-Key": KEY}, json={"image_id": "mock_dry"}
    )
    assert response.status_code == 200 and response.get_json()["skin_type"] == "Dry"


def documented_accepts(schema, value):
    """Whether ``value`` matches a string schema's pattern and length, as JSON Schema reads them."""
    pattern = schema["pattern"]
    assert pattern.startswith("^") and pattern.endswith("$")  # ECMA's $ never matches before a final newline
    matches = re.fullmatch(pattern[1:-1], value) is not None
    return matches and len(value) <= schema.get("maxLength", len(value))


IMAGE_ID_SAMPLES = [
    REAL_ID,
    REAL_ID.upper(),
    "{" + REAL_ID + "}",
    REAL_ID.replace("-", ""),
    REAL_ID + "\n",
    "mock_oily",
    "mock_dry_user-7",
    "mock_combination_0",
    "mock_sensitive_a_b-c",
    "mock_normal_" + "a" * 52,  # 64 characters
    "mock_normal_" + "a" * 53,
    "mock_oily_",
    "mock_oily__2",
    "mock_dry_user--7",
    "mock_Oily",
    "mock_oily\n",
    "mock_",
    "../x",
    "",
]


@pytest.mark.parametrize("image_id", IMAGE_ID_SAMPLES, ids=repr)
def test_openapi_image_id_patterns_are_what_the_service_accepts(client, image_id):
    schemas = openapi_document()["components"]["schemas"]
    headers = {"X-API-Key": KEY}

    def accepted(response):
        if response.status_code == 400:
            assert response.get_json()["code"] == "invalid_image_id"
            return False
        assert response.status_code in (200, 404), response.get_data(as_text=True)
        return True

    accepts = documented_accepts(schemas["AnalysisImageId"], image_id)
    assert accepted(client.post("/analyze", headers=headers, json={"image_id": image_id})) == accepts
    query = "/analyze?" + urllib.parse.urlencode({"image_id": image_id})
    assert accepted(client.post(query, headers=headers)) == accepts
    if image_id and "/" not in image_id:  # otherwise no route: 404 not_found
        path = "/images/" + urllib.parse.quote(image_id)
        accepts = documented_accepts(schemas["UploadedImageId"], image_id)
        assert accepted(client.get(path, headers=headers)) == accepts
        assert accepted(client.delete(path, headers=headers)) == accepts


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


# --- metrics ---------------------------------------------------------------------------

TOKEN = "metrics-token-0123456789abcdef"


def scrape(client, token=TOKEN):
    return client.get("/metrics", headers={"Authorization": f"Bearer {token}"})


def samples(response):
    """The scrape's samples as {(name, frozenset(labels)): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    assert response.status_code == 200, response.data
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.get_data(as_text=True))
        for sample in family.samples
    }


def test_metrics_are_not_served_when_off(client):
    assert_problem(client.get("/metrics"), 404, "not_found")
    assert_problem(scrape(client), 404, "not_found")


@pytest.mark.parametrize("authorization", [None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", TOKEN])
def test_metrics_need_the_bearer_token(make_app, authorization):
    client = make_app(METRICS_TOKEN=TOKEN).test_client()
    response = client.get("/metrics", headers={"Authorization": authorization} if authorization else {})
    assert_problem(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


def test_metrics_count_what_the_service_did(make_app):
    client = make_app(METRICS_TOKEN=TOKEN).test_client()
    image_ids = [upload(client, unique_jpeg(10_000)).get_json()["image_id"] for _ in range(3)]
    upload_once(client, unique_jpeg(1_000), "k")
    upload_once(client, make_png(), "k")  # the same key, other bytes: 422
    assert analyze(client, image_ids[0]).status_code == analyze(client, image_ids[0]).status_code == 200
    analyze(client, "mock_oily")
    analyze(client, "../etc/passwd")
    client.get("/nope", headers={"X-API-Key": "wrong"})
    found = samples(scrape(client))

    def value(name, **labels):
        return found.get((name, frozenset(labels.items())), 0)

    assert value("skin_http_requests_total", route="/upload", method="POST", status="201") == 4
    assert value("skin_http_requests_total", route="/upload", method="POST", status="422") == 1
    assert value("skin_http_requests_total", route="/analyze", method="POST", status="200") == 3
    assert value("skin_http_requests_total", route="unmatched", method="GET", status="401") == 1
    assert value("skin_http_request_duration_seconds_count", route="/analyze") == 4
    assert value("skin_images_stored_total", type="image/jpeg") == 4
    assert value("skin_upload_bytes_total", type="image/jpeg") == 3 * 10_000 + 1_000
    assert [value("skin_analyses_total", result=result) for result in ("new", "stored", "fixture")] == [
        1,
        1,
        1,
    ]
    assert value("skin_refusals_total", code="idempotency_key_reused") == 1
    assert value("skin_refusals_total", code="invalid_image_id") == 1
    assert value("skin_refusals_total", code="unauthorized") == 1
    assert value("skin_admission_wait_seconds_count") >= 9 and value("skin_admission_waiting") == 0


def test_no_label_takes_a_value_from_the_request(make_app):
    client = make_app(METRICS_TOKEN=TOKEN).test_client()
    client.open("/nope-" + "x" * 50, method="BREW", headers={"X-API-Key": KEY})
    client.get(f"/images/{uuid.uuid4()}", headers={"X-API-Key": KEY})
    client.post("/upload", headers={"X-API-Key": KEY, "Content-Type": "text/x-evil"}, data=b"x")
    text = scrape(client).get_data(as_text=True)
    assert "nope" not in text and "BREW" not in text and "evil" not in text
    found = samples(scrape(client))
    assert (
        "skin_http_requests_total",
        frozenset({"route": "unmatched", "method": "other", "status": "405"}.items()),
    ) in found or (
        "skin_http_requests_total",
        frozenset({"route": "unmatched", "method": "other", "status": "404"}.items()),
    ) in found
    assert (
        "skin_http_requests_total",
        frozenset({"route": "/images/<image_id>", "method": "GET", "status": "404"}.items()),
    ) in found


def test_metrics_do_not_queue_behind_busy_requests(make_app):
    app = make_app(METRICS_TOKEN=TOKEN)
    gate = app.extensions["gate"]
    with gate, gate:  # every slot taken
        with ThreadPoolExecutor(1) as pool:
            assert pool.submit(scrape, app.test_client()).result(timeout=5).status_code == 200


# --- rate limits ----------------------------------------------------------------------------


def limited(client, response, name, quota):
    """A 429 as the IETF draft's RateLimit fields describe it."""
    body = assert_problem(response, 429, "rate_limited")
    assert name in body["detail"]
    reset = int(response.headers["Retry-After"])
    assert 0 < reset <= 60
    assert response.headers["RateLimit-Policy"] == f'"{name}";q={quota};w=60'
    assert response.headers["RateLimit"] == f'"{name}";r=0;t={reset}'


def test_uploads_over_their_limit_are_refused_unread(make_app, store, monkeypatch):
    client = make_app(RATE_LIMIT_UPLOAD="3/minute").test_client()
    assert [
        upload(client, unique_jpeg(2_000), path=path).status_code
        for path in ("/upload", "/api/v1/upload", "/upload")
    ] == [201] * 3

    class Unreadable(io.BytesIO):
        def read(self, *args):
            raise AssertionError("a refused upload must not be read")

        readinto = readline = read

    environ = EnvironBuilder(
        path="/upload",
        method="POST",
        headers={"X-API-Key": KEY, "Content-Type": "multipart/form-data; boundary=x"},
        input_stream=Unreadable(),
    ).get_environ()
    environ.update(CONTENT_LENGTH="100000", REMOTE_ADDR="127.0.0.1")  # as the test client's
    chunks, status, headers = run_wsgi_app(client.application, environ, buffered=True)
    assert status.startswith("429")
    limited(client, client.post("/upload", headers={"X-API-Key": KEY}), "upload", 3)
    assert len(store.image_names()) == 3
    # Another phone, and another app's key, have budgets of their own.
    other_phone = {"REMOTE_ADDR": "203.0.113.7"}
    assert (
        client.post(
            "/upload",
            headers={"X-API-Key": KEY},
            environ_base=other_phone,
            data={"file": (io.BytesIO(make_jpeg()), "a.jpg")},
        ).status_code
        == 201
    )


def test_another_key_has_its_own_upload_budget(make_app):
    client = make_app(RATE_LIMIT_UPLOAD="1/minute", API_KEY=f"{KEY},{OTHER_KEY}").test_client()
    assert upload(client, make_jpeg(), key=KEY).status_code == 201
    assert upload(client, make_jpeg(), key=KEY).status_code == 429
    assert upload(client, make_jpeg(), key=OTHER_KEY).status_code == 201


def test_analyses_over_their_limit_are_refused_also_when_stored(make_app):
    client = make_app(RATE_LIMIT_ANALYZE="3/minute").test_client()
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    assert [analyze(client, image_id).status_code for _ in range(3)] == [200] * 3  # the last two stored
    limited(client, analyze(client, image_id), "analyze", 3)
    limited(client, analyze(client, "mock_dry", path="/api/v1/analyze"), "analyze", 3)


def test_an_auth_failure_limit_stops_a_key_guessing_loop(make_app):
    client = make_app(RATE_LIMIT_AUTH_FAILURES="5/minute").test_client()
    guesses = [analyze(client, "mock_oily", key=f"guess-{n}").status_code for n in range(8)]
    assert guesses == [401] * 5 + [429] * 3
    limited(
        client, analyze(client, "mock_oily", key=KEY), "auth-failures", 5
    )  # not even the right key is tried
    limited(client, client.get("/nope", headers={"X-API-Key": "guess"}), "auth-failures", 5)
    elsewhere = {"REMOTE_ADDR": "203.0.113.8"}
    assert (
        client.post(
            "/analyze", headers={"X-API-Key": KEY}, json={"image_id": "mock_oily"}, environ_base=elsewhere
        ).status_code
        == 200
    )


@pytest.mark.parametrize("setting", ["RATE_LIMIT_UPLOAD", "RATE_LIMIT_ANALYZE", "RATE_LIMIT_AUTH_FAILURES"])
def test_limits_that_are_not_set_are_not_asked(make_app, capsys, setting):
    client = make_app(**{setting: "100/minute"}).test_client()
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    assert [analyze(client, image_id).status_code for _ in range(3)] == [200] * 3  # the last two stored
    assert analyze(client, image_id, key="guess").status_code == 401
    assert "rate limit storage unreachable" not in capsys.readouterr().out


def test_refusals_are_counted_by_the_limit_that_refused(make_app):
    client = make_app(
        METRICS_TOKEN=TOKEN,
        RATE_LIMIT_UPLOAD="1/minute",
        RATE_LIMIT_ANALYZE="1/minute",
        RATE_LIMIT_AUTH_FAILURES="1/minute",
    ).test_client()
    assert [upload(client, make_jpeg()).status_code for _ in range(2)] == [201, 429]
    assert [analyze(client, "mock_oily").status_code for _ in range(2)] == [200, 429]
    assert [analyze(client, "mock_oily", key=f"guess-{n}").status_code for n in range(2)] == [401, 429]
    found = samples(scrape(client))
    counted = {
        limit: found.get(("skin_rate_limited_total", frozenset({("limit", limit)})), 0)
        for limit in ("upload", "analyze", "auth-failures", "other")
    }
    assert counted == {"upload": 1, "analyze": 1, "auth-failures": 1, "other": 0}


def test_limits_hold_in_each_workers_memory_while_redis_cannot_be_reached(make_app):
    with socket.socket() as sock:  # a port that nothing listens on
        sock.bind(("127.0.0.1", 0))
        url = f"redis://127.0.0.1:{sock.getsockname()[1]}"
    client = make_app(RATE_LIMIT_STORAGE_URL=url, RATE_LIMIT_AUTH_FAILURES="3/minute").test_client()
    guesses = [analyze(client, "mock_oily", key=f"guess-{n}").status_code for n in range(5)]
    assert guesses == [401] * 3 + [429] * 2
    limited(client, analyze(client, "mock_oily", key=KEY), "auth-failures", 3)


def test_health_docs_and_the_document_are_never_limited(make_app):
    client = make_app(
        RATE_LIMIT_AUTH_FAILURES="1/minute", RATE_LIMIT_UPLOAD="1/minute", RATE_LIMIT_ANALYZE="1/minute"
    ).test_client()
    for n in range(3):
        analyze(client, "mock_oily", key=f"guess-{n}")
    for path in ("/health", "/api/v1/health", "/docs", "/openapi.json", "/docs/swagger-ui.css"):
        assert [client.get(path).status_code for _ in range(3)] == [200] * 3, path


@pytest.mark.parametrize(
    "env, message",
    [
        ({"RATE_LIMIT_UPLOAD": "lots"}, "RATE_LIMIT_UPLOAD"),
        ({"RATE_LIMIT_ANALYZE": "5/fortnight"}, "RATE_LIMIT_ANALYZE"),
        ({"RATE_LIMIT_AUTH_FAILURES": "-1/minute"}, "RATE_LIMIT_AUTH_FAILURES"),
        ({"RATE_LIMIT_STORAGE_URL": "memcached://localhost"}, "RATE_LIMIT_STORAGE_URL"),
        ({"METRICS_TOKEN": "short"}, "METRICS_TOKEN"),
        ({"METRICS_TOKEN": "has spaces in the token 0123456"}, "METRICS_TOKEN"),
    ],
)
def test_bad_operator_settings_stop_the_start(uploads, env, message):
    with pytest.raises(SystemExit) as stopped:
        create_app({"UPLOAD_DIR": str(uploads), "API_KEY": KEY, **env})
    assert str(stopped.value).startswith("Configuration error: " + message)


def test_the_start_up_line_says_registry_limits_and_metrics(make_app, capsys):
    make_app(RATE_LIMIT_UPLOAD="30/minute", RATE_LIMIT_AUTH_FAILURES="10/minute", METRICS_TOKEN=TOKEN)
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "service ready" in line]
    assert "registry=" in line and "metrics=on" in line
    assert 'rate_limits="upload=30/minute auth-failures=10/minute in per-worker memory"' in line


@pytest.mark.parametrize("size", [20_000, 1_500_000], ids=["in memory", "spooled to a file"])
def test_large_photos_lose_their_location_as_small_ones_do(client, store, size):
    metadata = exif_segment(exif_tiff()) + b"".join(LOCATING_SEGMENTS)
    sent = make_jpeg(segments=[metadata], size=size)
    stored = stored_image(store, upload(client, sent))
    assert stored == sent.replace(metadata, exif_segment(MINIMAL_EXIF["<"]), 1)
    assert len(stored) < len(sent)


@pytest.mark.parametrize("size", [1_000, 1_000_000], ids=["in memory", "spooled to a file"])
def test_text_chunks_of_any_size_leave_a_png(client, store, size):
    text = png_chunk(b"tEXt", b"Comment\x00" + b"GPS 52.52 13.40 " * (size // 16))
    stored = stored_image(store, upload(client, make_png(extra_chunks=[text]), content_type="image/png"))
    assert stored == make_png()
