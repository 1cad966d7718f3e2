"""Tests of receiving.py: the upload's file part found as the body arrives, checked against Werkzeug."""

import io
import os
import random

import pytest
from werkzeug.sansio.multipart import Data, Epilogue, Field, File, MultipartDecoder, NeedData

import metrics
import receiving
import storage
from conftest import make_png

# How the bodies arrive: whole, byte by byte, in small and uneven pieces.
SPLITS = [None, 1, 2, 3, 7, 64]


class Arriving(io.RawIOBase):
    """A request body that arrives ``step`` bytes per read at most."""

    def __init__(self, body, step):
        self.body = memoryview(body)
        self.step = step or len(body) or 1

    def readable(self):
        return True

    def read(self, size=-1):
        size = min(self.step, len(self.body) if size < 0 else size)
        piece, self.body = bytes(self.body[:size]), self.body[size:]
        return piece


def receive(body, boundary, step=None, tmp_path=None, **limits):
    """Run an upload body through Admission; return what reached the app as (file content, error)."""
    seen = {}

    def app(environ, start_response):
        received = environ[receiving.RECEIVED]
        if received.file is not None:
            with received.file.view() as data:
                seen["file"] = bytes(data)
        seen["received"] = received
        return []

    admission = receiving.Admission(
        app,
        upload_paths={"/upload"},
        analyze_paths=set(),
        unqueued_paths=set(),
        may_receive=lambda environ: True,
        upload_limit=limits.get("upload_limit", 10**9),
        file_limit=limits.get("file_limit", 10**9),
        analyze_limit=0,
        client_timeout=5,
        spool=lambda size, fingerprinted: storage.Spool(tmp_path or "/tmp", named=False, size=size),
        slots=1,
        metrics=metrics.NoMetrics(),
    )
    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": "/upload",
        "CONTENT_TYPE": f'multipart/form-data; boundary="{boundary.decode()}"',
        "CONTENT_LENGTH": str(len(body)),
        "wsgi.input": Arriving(body, step),
    }
    admission(environ, lambda *args: None)
    return seen.get("file"), seen["received"]


def our_part(body, boundary, step=None):
    """The first part named ``file`` as Admission spools it, or None where it finds the body malformed."""
    content, received = receive(body, boundary, step)
    if isinstance(received.error, receiving.InvalidMultipart):
        return None
    assert received.error is None, received.error
    return content


def werkzeug_part(body, boundary):
    """The raw bytes of the first part named ``file``, as Werkzeug's own multipart decoder sees them."""
    decoder = MultipartDecoder(boundary, max_parts=receiving.MAX_PARTS)
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


@pytest.mark.parametrize("step", SPLITS, ids=lambda step: f"{step or 'whole'}")
@pytest.mark.parametrize("label, boundary, body", list(corpus()), ids=[case[0] for case in corpus()])
def test_the_file_part_is_found_as_werkzeug_finds_it(label, boundary, body, step):
    assert our_part(body, boundary.encode(), step) == werkzeug_part(body, boundary.encode())


@pytest.mark.parametrize("step", SPLITS, ids=lambda step: f"{step or 'whole'}")
def test_werkzeug_agrees_on_cut_and_damaged_bodies(step):
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
        assert our_part(variant, boundary.encode(), step) == werkzeug_part(variant, boundary.encode()), (
            variant
        )


def test_large_bodies_arriving_in_uneven_pieces(tmp_path):
    """Megabytes of content full of near-delimiters, cut at random points, reach the spool intact."""
    rng = random.Random(20261201)
    content = b"".join(
        rng.choice([os.urandom(4096), b"\r\n--b0undar", b"\r\n--b0undary-x", b"\r", b"\n--"])
        for _ in range(900)
    )
    body = (
        b'--b0undary\r\nContent-Disposition: form-data; name="note"\r\n\r\nhi\r\n'
        b'--b0undary\r\nContent-Disposition: form-data; name="file"; filename="a"\r\n\r\n'
        + content
        + b"\r\n--b0undary--\r\n"
    )
    for step in (rng.randrange(1, 300_000) for _ in range(5)):
        found, received = receive(body, b"b0undary", step, tmp_path)
        assert received.error is None and found == content == werkzeug_part(body, b"b0undary")


def test_a_boundary_line_longer_than_the_buffer_is_refused(monkeypatch):
    monkeypatch.setattr(receiving, "WINDOW_BYTES", 4096)
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc\r\n--xyz'
        + b" " * 5000
        + b"\r\n--xyz--\r\n"
    )
    _, received = receive(body, b"xyz", 1000)
    assert isinstance(received.error, receiving.InvalidMultipart) and "longer than" in str(received.error)


def test_a_file_part_over_the_limit_is_only_counted(tmp_path):
    body = b'--xyz\r\nContent-Disposition: form-data; name="file"\r\n\r\n' + b"x" * 5000 + b"\r\n--xyz--\r\n"
    content, received = receive(body, b"xyz", 700, tmp_path, file_limit=4999)
    assert received.file_too_large and received.error is None and len(content) <= 4999
    content, received = receive(body, b"xyz", 700, tmp_path, file_limit=5000)
    assert not received.file_too_large and content == b"x" * 5000


def test_part_headers_sent_a_byte_at_a_time_are_searched_once(monkeypatch):
    """The blank line after a part's headers is looked for in new bytes only, not from the start each time."""
    searched = []
    real = receiving._BLANK_LINE

    class Counting:
        def search(self, buffer, pos, endpos):
            searched.append(endpos - pos)
            return real.search(buffer, pos, endpos)

    monkeypatch.setattr(receiving, "_BLANK_LINE", Counting())
    headers = b'--xyz\r\nContent-Disposition: form-data; name="file"\r\nX-Pad: ' + b"a" * 12_000
    body = headers + b"\r\n\r\nabc\r\n--xyz--\r\n"
    content, received = receive(body, b"xyz", 1)
    assert received.error is None and content == b"abc"
    assert sum(searched) < 5 * len(body)
