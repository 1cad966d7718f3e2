"""Fixtures and helpers shared by the test modules: images made in code, apps, real gunicorn servers."""

import io
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

import pytest
import requests

import images
import storage
from app import create_app
from bench.servers import RedisServer, SeaweedFS

REAL_ID = "3b241101-e2bb-4255-8caf-4136c566a962"


KEY = "test-key-0123456789"


OTHER_KEY = "rotated-key-9876543210"


HERE = Path(__file__).parent


UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def png_chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def make_png(width=4, height=3, extra_chunks=()):
    """A valid RGB PNG of a flat colour."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    rows = (b"\x00" + b"\x80\x60\x50" * width) * height
    return b"".join(
        [
            images.PNG_SIGNATURE,
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


@pytest.fixture
def uploads(tmp_path):
    folder = tmp_path / "uploads"
    folder.mkdir()
    return folder


def pytest_generate_tests(metafunc):
    """Run every test that uses a registry against the uploads folder and a bucket, but those marked folder."""
    if "backend" in metafunc.fixturenames:
        only_folder = metafunc.definition.get_closest_marker("folder") is not None
        metafunc.parametrize("backend", ["folder"] if only_folder else ["folder", "bucket"], indirect=True)


@pytest.fixture
def backend(request):
    return request.param


@pytest.fixture
def store(backend, uploads, request):
    """The registry the app is built on, and a look at what it holds, whatever the backend."""
    if backend == "folder":
        return FolderStore(uploads)
    return BucketStore(request.getfixturevalue("s3"))


@pytest.fixture
def make_app(store):
    def build(**env):
        return create_app({**store.env, "API_KEY": KEY, **env})

    return build


@pytest.fixture
def client(make_app):
    return make_app().test_client()


class LaterTime:
    """The time module, but ``seconds`` later."""

    def __init__(self, seconds):
        self.seconds = seconds

    def __getattr__(self, name):
        return getattr(time, name)

    def time(self):
        return time.time() + self.seconds


@pytest.fixture
def clock(monkeypatch):
    """Move the registries' clock forward by some seconds (the rest of the process keeps the real one)."""

    def forward(seconds):
        for module in (storage, sys.modules.get("bucket")):
            if module is not None:
                monkeypatch.setattr(module, "time", LaterTime(seconds))

    return forward


def stored_files(folder):
    return sorted(p.name for p in Path(folder).iterdir() if p.name != storage.KEY_FILE)


class FolderStore:
    """What the uploads folder holds, by file name."""

    def __init__(self, folder):
        self.folder = folder
        self.env = {"UPLOAD_DIR": str(folder)}

    def names(self):
        """Everything stored but the generated key: ``<id>.jpg``, ``<id>.json``, ``.idem-<digest>``, ..."""
        return stored_files(self.folder)

    def image_names(self):
        return sorted(p.name for p in Path(self.folder).iterdir() if p.suffix in (".jpg", ".png"))

    def image(self, image_id):
        (path,) = (p for p in Path(self.folder).glob(f"{image_id}.*") if p.suffix in (".jpg", ".png"))
        return path.read_bytes()

    def analysis(self, image_id):
        path = Path(self.folder) / f"{image_id}.json"
        return path.read_bytes() if path.exists() else None

    @property
    def key_location(self):
        return str(Path(self.folder) / storage.KEY_FILE)

    def key(self):
        return (Path(self.folder) / storage.KEY_FILE).read_text()

    def write_key(self, data):
        (Path(self.folder) / storage.KEY_FILE).write_bytes(data)

    def image_ids(self):
        return {name.partition(".")[0] for name in self.image_names()}

    def no_leftovers(self):
        """No temporary file is left in the folder."""
        return not [p for p in Path(self.folder).iterdir() if p.name.startswith(storage.TEMP_PREFIX)]

    def drop_image(self, image_id):
        """Remove the image alone, as a crash in the middle of a delete leaves it."""
        (path,) = (p for p in Path(self.folder).glob(f"{image_id}.*") if p.suffix in (".jpg", ".png"))
        path.unlink()


class BucketStore:
    """What a prefix of its own, in the session's bucket, holds, named as the uploads folder would name it.

    One bucket and a prefix per test: a bucket is a collection in SeaweedFS, with volumes of its own.
    """

    def __init__(self, s3):
        self.name = s3.bucket
        self.prefix = f"test-{uuid.uuid4().hex[:16]}/"
        self.client = s3.client()
        self.env = {"STORAGE_URL": f"s3://{self.name}/{self.prefix}", **s3.env}

    def keys(self):
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=self.prefix)
        return sorted(item["Key"][len(self.prefix) :] for page in pages for item in page.get("Contents", []))

    def names(self):
        names = []
        for key in self.keys():
            folder, _, name = key.partition("/")
            if folder == "images":
                head = self.client.head_object(Bucket=self.name, Key=self.prefix + key)
                names.append(name + storage.EXTENSIONS[head["ContentType"]])
            elif folder == "analyses":
                names.append(name)
            elif folder == "idempotency":
                names.append(storage.IDEMPOTENCY_PREFIX + name.removesuffix(".json"))
        return sorted(names)

    def image_names(self):
        return [name for name in self.names() if name.endswith((".jpg", ".png"))]

    def image_ids(self):
        return {key.removeprefix("images/") for key in self.keys() if key.startswith("images/")}

    def no_leftovers(self):
        """An instance keeps nothing of its own on disk: its spools are unnamed files, gone with it."""
        return True

    def read(self, key):
        try:
            return self.client.get_object(Bucket=self.name, Key=self.prefix + key)["Body"].read()
        except self.client.exceptions.NoSuchKey:
            return None

    def image(self, image_id):
        return self.read(f"images/{image_id}")

    def analysis(self, image_id):
        return self.read(f"analyses/{image_id}.json")

    @property
    def key_location(self):
        return f"s3://{self.name}/{self.prefix}api-key"

    def key(self):
        return self.read("api-key").decode()

    def write_key(self, data):
        self.client.put_object(Bucket=self.name, Key=self.prefix + "api-key", Body=data)

    def drop_image(self, image_id):
        self.client.delete_object(Bucket=self.name, Key=f"{self.prefix}images/{image_id}")


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


def multipart(parts, boundary="b0undary"):
    """Build a multipart body by hand from ``(headers, content)`` parts."""
    body = b"".join(
        b"--%s\r\n%s\r\n\r\n%s\r\n" % (boundary.encode(), headers, content) for headers, content in parts
    )
    return body + b"--%s--\r\n" % boundary.encode()


FILE_HEADERS = b'Content-Disposition: form-data; name="file"; filename="a.png"\r\nContent-Type: image/png'


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


def stored_image(store, response):
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    data = store.image(body["image_id"])
    assert body["size_bytes"] == len(data)
    return data


def delete(client, image_id, key=KEY, path="/images/"):
    return client.delete(path + image_id, headers={"X-API-Key": key})


def upload_once(client, data, idempotency_key, key=KEY):
    return upload(client, data, key=key, headers={"Idempotency-Key": idempotency_key})


def age(uploads, image_id, days):
    (path,) = (p for p in uploads.glob(f"{image_id}.*") if p.suffix in (".jpg", ".png"))
    when = time.time() - days * 86400
    os.utime(path, (when, when))


@pytest.fixture
def record(capsys):
    """Print a measured figure in the test run's output, for the closing notes."""

    def write(name, value):
        with capsys.disabled():
            print(f"\n[figure] {name}: {value}")

    return write


class Server:
    """gunicorn started as the Procfile starts it, on a free loopback port, on a store's registry."""

    def __init__(self, store, env=None, args=()):
        """Start it; ``env`` adds to the store's settings (without API_KEY it generates one)."""
        environment = {k: v for k, v in os.environ.items() if k not in ("API_KEY", "PORT", "WEB_CONCURRENCY")}
        environment.update({**store.env, **(env or {})})
        self.folder = tempfile.mkdtemp(prefix="gunicorn-")
        command = [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            "gunicorn.conf.py",
            "--bind",
            "127.0.0.1:0",
            # Each master's own control socket: by default every one on a machine shares a path.
            "--control-socket",
            f"{self.folder}/gunicorn.ctl",
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
            assert self.process.poll() is None, "gunicorn exited:\n" + self.output()[-3000:]
            time.sleep(0.05)
        else:
            raise AssertionError("gunicorn did not start")
        while requests.get(self.url + "/health", timeout=5).status_code != 200:
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *error):
        self.stop()

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def stop(self):
        """Stop the server, and fail the test if it answered any request with a 500."""
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        log = self.output()
        self.log.close()
        shutil.rmtree(self.folder, ignore_errors=True)
        assert "status=500" not in log and "unhandled error" not in log, log[-2000:]


@pytest.fixture
def server(store):
    with Server(store, {"API_KEY": KEY}) as running:
        yield running


def analyze_over_http(server, image_id):
    return requests.post(
        server.url + "/analyze", headers={"X-API-Key": KEY}, json={"image_id": image_id}, timeout=10
    )


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


def health_status(server):
    return requests.get(server.url + "/health", timeout=10).status_code


# --- real servers (bench/servers.py) ------------------------------------------


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """One S3 server and bucket for the whole run; every test that uses them gets a prefix of its own."""
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        server.stop()


def needs(program, package):
    """Return the path of ``program``; skip without it, or fail in CI, where .ci/run installs it."""
    path = shutil.which(program)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{program} is missing: .ci/run installs {package}")
        pytest.skip(f"needs Debian's {package} (apt-get install {package})")
    return path


@pytest.fixture
def redis_server(tmp_path):
    needs("redis-server", "redis-server")
    server = RedisServer(tmp_path).start()
    try:
        yield server
    finally:
        if server.process.poll() is None:
            server.stop()
