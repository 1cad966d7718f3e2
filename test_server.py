"""Tests against real gunicorn servers started as the Procfile starts them (marked slow)."""

import functools
import hashlib
import importlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

import images
from bench.servers import SeaweedFS
from conftest import (
    FILE_HEADERS,
    HERE,
    KEY,
    REAL_ID,
    BucketStore,
    FolderStore,
    Server,
    analyze_over_http,
    health_status,
    image_files,
    make_jpeg,
    make_png,
    multipart,
    needs,
    no_temp_files,
    unique_jpeg,
    wait_healthy,
    worker_pids,
)


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
def test_curl_gets_413_for_huge_upload(server, store, big_files, megabytes, expect):
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
    assert store.names() == []


@pytest.mark.slow
@pytest.mark.parametrize("megabytes", [20, 60])
def test_requests_gets_413_for_huge_upload(server, store, big_files, megabytes):
    with open(big_files[megabytes], "rb") as file:
        response = requests.post(
            server.url + "/upload", headers={"X-API-Key": KEY}, files={"file": file}, timeout=60
        )
    assert response.status_code == 413
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json()["code"] == "file_too_large"
    assert store.names() == []


@pytest.mark.slow
def test_gunicorn_end_to_end(server, store):
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
    assert store.image(image_id) == data


@pytest.mark.slow
def test_chunked_upload_over_the_limit_gets_413(server, store):
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
    assert store.names() == []


@pytest.mark.slow
@pytest.mark.parametrize("preload", [True, False], ids=["procfile", "workers-start-together"])
def test_workers_agree_on_the_generated_key(store, preload):
    args = ["--workers", "4"] + (
        [] if preload else ["--config", os.devnull, "--worker-class", "gthread", "app:create_app()"]
    )
    with Server(store, args=args) as running:
        key = store.key()
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
def test_stalled_upload_is_cut_off_and_discarded(store):
    with Server(store, {"API_KEY": KEY, "CLIENT_TIMEOUT": "1"}) as running:
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
        assert store.names() == []


@pytest.mark.slow
def test_slow_and_silent_clients_do_not_hold_up_others(store, record):
    """Trickling uploads, silent connections and dribbled headers; a good client is still served."""
    body = multipart([(FILE_HEADERS, make_jpeg(size=1_000_000))])
    head = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Length: %d\r\n"
        b"Content-Type: multipart/form-data; boundary=b0undary\r\n\r\n" % (KEY.encode(), len(body))
    )
    with Server(store, {"API_KEY": KEY}) as running:  # the Procfile's settings: 2 workers
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


@pytest.mark.slow
def test_killed_workers_never_lose_or_corrupt_uploads(store, record):
    running = Server(store, {"API_KEY": KEY})  # the Procfile's settings: 2 workers
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
    stored = store.image_ids()
    for image_id, digest in acknowledged.items():
        assert hashlib.sha256(store.image(image_id)).hexdigest() == digest
    # A worker killed after the rename (or PUT) but before its 201 left leaves a complete image
    # whose id nobody learned; it must still be exactly one of the uploads sent, never a partial one.
    for image_id in stored - set(acknowledged):
        assert hashlib.sha256(store.image(image_id)).hexdigest() in sent
    Server(store, {"API_KEY": KEY}).stop()  # the next start removes what the kills left
    assert store.no_leftovers()
    record(
        "worker kills",
        f"{kills} SIGKILLs, {len(sent)} uploads sent, {len(acknowledged)} acknowledged and byte-identical,"
        f" {len(stored - set(acknowledged))} complete but unacknowledged",
    )


@pytest.mark.slow
def test_concurrent_retries_across_workers_store_one_image(store, record):
    data = unique_jpeg(2_000_000)
    headers = {"X-API-Key": KEY, "Idempotency-Key": "photo-1", "Connection": "close"}
    with Server(store, {"API_KEY": KEY, "WEB_CONCURRENCY": "3"}) as running:
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
    assert store.image_names() == [f"{image_ids.pop()}.jpg"]
    record("12 simultaneous retries over 3 workers", dict(statuses))


@pytest.mark.slow
def test_deletes_racing_analyses_across_workers_leave_nothing_behind(store):
    with Server(store, {"API_KEY": KEY, "WEB_CONCURRENCY": "3"}) as running:
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
    assert store.names() == []  # no analysis outlived its image


@pytest.mark.slow
def test_server_killed_outright_keeps_everything_acknowledged(store):
    running = Server(store, {"API_KEY": KEY})
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
    with Server(store, {"API_KEY": KEY}) as restarted:
        for image_id, (data, analysis_body) in results.items():
            assert store.image(image_id) == data
            response = session.post(restarted.url + "/analyze", json={"image_id": image_id}, timeout=10)
            assert response.content == analysis_body


@pytest.mark.slow
def test_concurrent_uploads_and_analyses_across_workers(store):
    with Server(store, {"API_KEY": KEY, "WEB_CONCURRENCY": "3"}) as running:
        photos = [unique_jpeg(50_000) for _ in range(64)]

        def send(data):
            response = requests.post(
                running.url + "/upload",
                headers={"X-API-Key": KEY},
                files={"file": ("a.jpg", data)},
                timeout=30,
            )
            return response.status_code, response.json()["image_id"]

        with ThreadPoolExecutor(64) as pool:
            uploaded = list(pool.map(send, photos))
        assert {status for status, _ in uploaded} == {201}
        assert len({image_id for _, image_id in uploaded}) == 64
        for (_, image_id), data in zip(uploaded, photos):
            assert store.image(image_id) == data

        target = uploaded[0][1]
        with ThreadPoolExecutor(50) as pool:
            bodies = list(pool.map(lambda _: analyze_over_http(running, target).content, range(200)))
        assert len(set(bodies)) == 1
        assert store.analysis(target) == bodies[0]
        assert json.loads(bodies[0])["image_id"] == target
        assert store.no_leftovers()


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


MULTIPART_TYPE = "multipart/form-data; boundary=b0undary"


def http_request(path, body, content_type, close=False):
    """One request as bytes, for sending several on one connection."""
    return (
        b"POST %s HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n%s\r\n"
        % (path.encode(), KEY.encode(), content_type.encode(), len(body), b"Connection: close\r\n" * close)
    ) + body


def http_responses(answer):
    """Split the answers read from one connection into (status, body) pairs."""
    responses = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: (\d+)", head)[1])
        responses.append((int(head.split()[1]), rest[:length]))
        answer = rest[length:]
    return responses


@pytest.mark.slow
def test_requests_pipelined_behind_bodies_read_from_the_socket_are_served(server, store):
    """Bodies are read from gunicorn's socket directly: whatever follows one is the next request."""
    photos = [unique_jpeg(300_000), make_png(), unique_jpeg(2_000_000)]
    analysis_body = json.dumps({"image_id": "mock_oily"}).encode()
    requests_ = [
        http_request("/analyze", analysis_body, "application/json")
    ] * 2  # small: read with the headers
    requests_ += [
        http_request("/upload", multipart([(FILE_HEADERS, data)]), MULTIPART_TYPE) for data in photos
    ]
    requests_.append(http_request("/analyze", analysis_body, "application/json", close=True))
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(b"".join(requests_))
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    responses = http_responses(answer)
    assert [status for status, _ in responses] == [200, 200, 201, 201, 201, 200]
    assert responses[0][1] == responses[1][1] == responses[-1][1]
    stored = [json.loads(body)["image_id"] for _, body in responses[2:5]]
    for image_id, data in zip(stored, photos):
        assert store.image(image_id) == data


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
def test_broken_chunked_bodies_are_4xx(server, store, body, shut_write, code):
    head = (
        b"POST /upload HTTP/1.1\r\nHost: x\r\nX-API-Key: %s\r\nTransfer-Encoding: chunked\r\n"
        b"Content-Type: multipart/form-data; boundary=b\r\n\r\n" % KEY.encode()
    )
    answer = raw_request(server, head + body, shut_write)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert b'"code":"%s"' % code.encode() in answer
    assert store.names() == []


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


@pytest.mark.slow
def test_full_read_only_and_deleted_folders_fail_cleanly_and_recover(small_disk):
    folder = small_disk / "uploads"
    with Server(FolderStore(folder), {"API_KEY": KEY, "MAX_UPLOAD_BYTES": "1000000"}) as running:
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
            assert images.inspect(path.read_bytes())  # every stored file is whole
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
def test_sigterm_lets_uploads_in_flight_finish(store):
    with Server(store, {"API_KEY": KEY}) as running:
        photos = [unique_jpeg(2_000_000) for _ in range(3)]
        connections = []
        for data in photos:
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
        stored = {hashlib.sha256(store.image(image_id)).digest() for image_id in store.image_ids()}
        assert stored == {hashlib.sha256(data).digest() for data in photos}
        assert store.no_leftovers()


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
def test_oversized_and_malformed_requests_are_refused_cheaply(server, store, record):
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
    assert store.names() == []
    peaks = [
        re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text())[1]
        for pid in worker_pids(server)
    ]
    record("oversized requests", f"RSS growth {growth} KiB over both workers; peak RSS {peaks} KiB")


# --- two instances, one bucket ---------------------------------------------------------------


@pytest.fixture
def instances(s3):
    """Two services with nothing in common but their bucket, as two instances behind a router."""
    store = BucketStore(s3)
    with Server(store, {"API_KEY": KEY}) as first, Server(store, {"API_KEY": KEY}) as second:
        yield store, first, second


@pytest.mark.slow
def test_an_image_uploaded_through_one_instance_is_served_by_the_other(instances):
    store, first, second = instances
    headers = {"X-API-Key": KEY}
    data = unique_jpeg(300_000)
    image_id = requests.post(first.url + "/upload", headers=headers, files={"file": data}, timeout=10).json()[
        "image_id"
    ]
    described = requests.get(f"{second.url}/images/{image_id}", headers=headers, timeout=10)
    assert described.status_code == 200 and described.json()["size_bytes"] == len(data)
    assert analyze_over_http(second, image_id).content == analyze_over_http(first, image_id).content
    assert requests.delete(f"{second.url}/images/{image_id}", headers=headers, timeout=10).status_code == 204
    assert requests.get(f"{first.url}/images/{image_id}", headers=headers, timeout=10).status_code == 404
    assert store.names() == []


@pytest.mark.slow
def test_first_analyses_over_two_instances_agree_on_one_record(instances, record):
    store, first, second = instances
    image_id = requests.post(
        first.url + "/upload", headers={"X-API-Key": KEY}, files={"file": make_jpeg()}, timeout=10
    ).json()["image_id"]
    barrier = threading.Barrier(50)

    def first_analysis(n):
        if n < 50:
            barrier.wait()
        response = requests.post(
            (first, second)[n % 2].url + "/analyze",
            headers={"X-API-Key": KEY, "Connection": "close"},
            json={"image_id": image_id},
            timeout=30,
        )
        assert response.status_code == 200
        return response.content

    started = time.monotonic()
    with ThreadPoolExecutor(50) as pool:
        bodies = set(pool.map(first_analysis, range(200)))
    assert bodies == {store.analysis(image_id)}
    assert store.names() == sorted([f"{image_id}.jpg", f"{image_id}.json"])
    record("200 first analyses over two instances", f"{time.monotonic() - started:.1f} s, one record")


@pytest.mark.slow
def test_retries_over_two_instances_store_one_image(instances, record):
    store, first, second = instances
    data = unique_jpeg(2_000_000)
    headers = {"X-API-Key": KEY, "Idempotency-Key": "photo-1", "Connection": "close"}
    barrier = threading.Barrier(12)

    def retry(n):
        barrier.wait()
        return requests.post(
            (first, second)[n % 2].url + "/upload", headers=headers, files={"file": data}, timeout=30
        )

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(retry, range(12)))
    statuses = Counter(response.status_code for response in responses)
    assert set(statuses) <= {201, 409} and statuses[201] >= 1
    image_ids = {response.json()["image_id"] for response in responses if response.status_code == 201}
    assert len(image_ids) == 1 and store.image_ids() == image_ids
    later = requests.post(second.url + "/upload", headers=headers, files={"file": data}, timeout=30)
    assert later.headers["Idempotent-Replayed"] == "true" and {later.json()["image_id"]} == image_ids
    record("12 simultaneous retries over two instances", dict(statuses))


@pytest.mark.slow
def test_instances_starting_together_on_an_empty_bucket_agree_on_the_key(s3):
    store = BucketStore(s3)
    with ThreadPoolExecutor(2) as pool:
        servers = list(pool.map(lambda _: Server(store), range(2)))  # no API_KEY: each generates one
    try:
        key = store.key()
        for running in servers:
            response = requests.post(
                running.url + "/analyze",
                headers={"X-API-Key": key},
                json={"image_id": "mock_dry"},
                timeout=10,
            )
            assert response.status_code == 200
    finally:
        for running in servers:
            running.stop()


# --- a bucket that goes away --------------------------------------------------------------------


@pytest.fixture
def own_s3(tmp_path):
    """An S3 server of this test's own, to stop and freeze without disturbing the others."""
    server = SeaweedFS(tmp_path / "seaweedfs")
    try:
        server.start()
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        server.stop()


def timed(call):
    started = time.monotonic()
    result = call()
    return result, time.monotonic() - started


@pytest.mark.slow
@pytest.mark.parametrize("failure", ["stopped", "frozen"])
def test_a_bucket_that_goes_away_gives_prompt_503s_and_then_recovers(own_s3, failure, record):
    store = BucketStore(own_s3)
    with Server(store, {"API_KEY": KEY}) as running:
        session = requests.Session()
        session.headers["X-API-Key"] = KEY
        stored = session.post(running.url + "/upload", files={"file": make_jpeg()}, timeout=10).json()[
            "image_id"
        ]
        (own_s3.stop if failure == "stopped" else own_s3.pause)()
        try:
            health, health_seconds = timed(lambda: session.get(running.url + "/health", timeout=30))
            refused = unique_jpeg(100_000)
            uploaded, upload_seconds = timed(
                lambda: session.post(running.url + "/upload", files={"file": refused}, timeout=60)
            )
            analyzed, analyze_seconds = timed(
                lambda: session.post(
                    running.url + "/analyze", json={"image_id": str(uuid.uuid4())}, timeout=60
                )
            )
        finally:
            (own_s3.start if failure == "stopped" else own_s3.resume)()
        for response in (health, uploaded, analyzed):
            assert response.status_code == 503 and response.json()["code"] == "storage_unavailable"
        assert health_seconds < 3 and upload_seconds < 15 and analyze_seconds < 15
        # Back without a restart of the service, and nothing half-done from the failed upload.
        deadline = time.monotonic() + 30
        while session.get(running.url + "/health", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, "the service did not recover"
            time.sleep(0.2)
        # A frozen bucket may still store the PUT it was sent once it thaws: never a part of it,
        # and the client, told 503, retries (with an Idempotency-Key, into the same image).
        orphans = store.image_ids() - {stored}
        assert len(orphans) <= (failure == "frozen") and all(store.image(i) == refused for i in orphans)
        assert analyze_over_http(running, stored).status_code == 200
        assert (
            session.post(running.url + "/upload", files={"file": make_jpeg()}, timeout=10).status_code == 201
        )
    record(
        f"bucket {failure}",
        f"health 503 in {health_seconds:.2f} s, upload 503 in {upload_seconds:.2f} s,"
        f" new analysis 503 in {analyze_seconds:.2f} s",
    )


# --- metrics and rate limits over several workers -----------------------------------------------

TOKEN = "metrics-token-0123456789abcdef"


def metric(server, name, **labels):
    """One sample of a scrape, 0 when absent."""
    from prometheus_client.parser import text_string_to_metric_families

    response = requests.get(server.url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10)
    assert response.status_code == 200, response.text
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0


def analyze_on_a_new_connection(server, key=KEY, image_id="mock_oily"):
    """A new connection each time, so the workers take turns as they accept them."""
    return requests.post(
        server.url + "/analyze",
        headers={"X-API-Key": key, "Connection": "close"},
        json={"image_id": image_id},
        timeout=10,
    )


@pytest.mark.slow
def test_the_scrape_adds_up_every_workers_counts_and_keeps_a_killed_ones(uploads, record):
    env = {"API_KEY": KEY, "METRICS_TOKEN": TOKEN, "WEB_CONCURRENCY": "3"}
    analyzed = {"name": "skin_http_requests_total", "route": "/analyze", "method": "POST", "status": "200"}
    with Server(FolderStore(uploads), env) as running:
        assert {analyze_on_a_new_connection(running).status_code for _ in range(60)} == {200}
        served_by = {metric(running, "skin_analyses_total", result="fixture") for _ in range(6)}
        assert served_by == {60}  # every worker's scrape sees every worker's counts
        victim = worker_pids(running)[0]
        os.kill(victim, signal.SIGKILL)
        assert wait_healthy(running)
        while len(worker_pids(running)) < 3 or victim in worker_pids(running):
            time.sleep(0.05)
        assert metric(running, **analyzed) == 60  # the killed worker's share included
        for _ in range(15):
            analyze_on_a_new_connection(running)
        assert metric(running, **analyzed) == 75
        assert metric(running, "skin_admission_waiting") == 0
    with Server(FolderStore(uploads), env) as restarted:
        assert metric(restarted, **analyzed) == 0  # a new start counts from zero
    record("metrics over 3 workers", "60 analyses counted once each; a SIGKILLed worker's share kept")


@pytest.mark.slow
def test_limits_hold_exactly_across_workers_and_instances_with_redis(tmp_path, redis_server):
    env = {
        "API_KEY": KEY,
        "RATE_LIMIT_STORAGE_URL": redis_server.url,
        "RATE_LIMIT_ANALYZE": "10/minute",
        "RATE_LIMIT_AUTH_FAILURES": "6/minute",
    }
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with (
        Server(FolderStore(tmp_path / "a"), env) as first,
        Server(FolderStore(tmp_path / "b"), env) as second,
    ):
        statuses = [analyze_on_a_new_connection((first, second)[n % 2]).status_code for n in range(16)]
        assert Counter(statuses) == {200: 10, 429: 6} and statuses[:10] == [200] * 10
        guesses = [
            analyze_on_a_new_connection((first, second)[n % 2], key=f"guess-{n}").status_code
            for n in range(20)
        ]
        assert Counter(guesses) == {401: 6, 429: 14} and guesses[:6] == [401] * 6


@pytest.mark.slow
def test_without_redis_each_worker_counts_on_its_own(uploads):
    """The README's promise: a limit of N with W workers and no Redis lets up to N x W through."""
    env = {"API_KEY": KEY, "RATE_LIMIT_ANALYZE": "3/minute", "WEB_CONCURRENCY": "2"}
    with Server(FolderStore(uploads), env) as running:
        headers = {"X-API-Key": KEY}
        one = requests.Session()  # a kept-alive connection stays with the worker that took it
        first_worker = [
            one.post(
                running.url + "/analyze", headers=headers, json={"image_id": "mock_dry"}, timeout=10
            ).status_code
            for _ in range(4)
        ]
        assert first_worker == [200, 200, 200, 429]
        deadline = time.monotonic() + 20
        while True:  # new connections until one reaches the other worker, which has its own count
            other = requests.Session()
            if (
                other.post(
                    running.url + "/analyze", headers=headers, json={"image_id": "mock_dry"}, timeout=10
                ).status_code
                == 200
            ):
                break
            other.close()
            assert time.monotonic() < deadline, "no connection reached the second worker"
        rest = [
            other.post(
                running.url + "/analyze", headers=headers, json={"image_id": "mock_dry"}, timeout=10
            ).status_code
            for _ in range(3)
        ]
        assert rest == [200, 200, 429]  # so 3 on each worker: 6 in all
        assert {analyze_on_a_new_connection(running).status_code for _ in range(10)} == {429}


@pytest.mark.slow
def test_redis_going_away_leaves_the_service_answering(uploads, redis_server, record):
    env = {
        "API_KEY": KEY,
        "RATE_LIMIT_STORAGE_URL": redis_server.url,
        "RATE_LIMIT_ANALYZE": "1000/minute",
        "RATE_LIMIT_AUTH_FAILURES": "3/minute",
    }
    counters = redis_server.client()
    with Server(FolderStore(uploads), env) as running:
        assert analyze_on_a_new_connection(running).status_code == 200
        counted = lambda: len(list(counters.scan_iter("*")))  # noqa: E731  (Redis keeps nothing on disk here)
        assert counted() == 1
        redis_server.stop()
        slowest = 0
        for _ in range(20):  # limits fall back to each worker's memory: nothing fails, nothing hangs
            response, seconds = timed(lambda: analyze_on_a_new_connection(running))
            assert response.status_code == 200
            slowest = max(slowest, seconds)
        assert slowest < 2
        guesses = [analyze_on_a_new_connection(running, key=f"guess-{n}").status_code for n in range(7)]
        assert set(guesses) <= {401, 429} and 429 in guesses  # at most 3 a worker, in its own memory
        redis_server.start()
        counters = redis_server.client()
        deadline = time.monotonic() + 40
        while counted() == 0:  # back to Redis by itself, within its backoff
            assert time.monotonic() < deadline, "the limits never came back to Redis"
            analyze_on_a_new_connection(running)
            time.sleep(0.5)
    record("Redis stopped mid-run", f"slowest analysis meanwhile {slowest:.2f} s; limits back on Redis")


# --- the document as its readers meet it: /docs in Chromium, a client generated from it ----------

DOCUMENT = json.loads((HERE / "openapi.json").read_text())
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# A laptop's browser window: what a client developer sees before scrolling.
FIRST_SCREEN = {"width": 1280, "height": 720}
HTTP_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}


@pytest.fixture
def docs(uploads):
    """Swagger UI's /docs page, served on the uploads folder and rendered in a first-screen-sized Chromium."""
    chromium = needs("chromium", "chromium")
    from playwright.sync_api import sync_playwright

    with Server(FolderStore(uploads), {"API_KEY": KEY}) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport=FIRST_SCREEN)
            page.goto(server.url + "/docs")
            page.wait_for_selector(".opblock", timeout=20_000)
            yield page, server.url
        finally:
            browser.close()


@pytest.mark.slow
def test_docs_show_the_first_operation_on_the_first_screen(docs):
    page, _ = docs
    top = page.locator(".opblock").first.bounding_box()["y"]
    assert page.evaluate("window.scrollY") == 0
    assert top < FIRST_SCREEN["height"], f"the first operation starts {top:.0f} px down the page"


@pytest.mark.slow
def test_docs_list_each_route_once_and_try_it_out_under_either_prefix(docs):
    page, url = docs
    operations = [path for path, item in DOCUMENT["paths"].items() for method in item.keys() & HTTP_METHODS]
    listed = page.locator(".opblock-summary-path").all_inner_texts()
    assert sorted(listed) == sorted(operations)  # each once: no /api/v1 copies
    menu = page.locator(".servers select")
    assert [option.get_attribute("value") for option in menu.locator("option").all()] == ["/", "/api/v1"]

    health = page.locator("#operations-Health-getHealth")
    health.locator(".opblock-summary").click()
    health.locator("button.try-out__btn").click()
    for prefix in ("/api/v1", ""):
        menu.select_option(prefix or "/")
        health.locator("button.execute").click()
        request_url = health.locator(".request-url pre")
        request_url.filter(has_text=f"{url}{prefix}/health").wait_for(timeout=10_000)
        status = health.locator(".live-responses-table tbody .response-col_status").first
        assert status.inner_text().strip() == "200"


@pytest.fixture(scope="module")
def generated_client(tmp_path_factory):
    """The package ``skin_client`` that OpenAPI Generator's python target makes of openapi.json."""
    needs("java", "default-jre-headless")
    folder = tmp_path_factory.mktemp("client")
    command = [
        Path(sys.executable).with_name("openapi-generator-cli"),
        "generate",
        "--input-spec",
        HERE / "openapi.json",
        "--generator-name",
        "python",
        "--output",
        folder,
        "--package-name",
        "skin_client",
        "--additional-properties",
        "generateSourceCodeOnly=true",
        "--global-property",
        "apiTests=false,modelTests=false,apiDocs=false,modelDocs=false",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    sys.path.insert(0, str(folder))
    try:
        yield importlib.import_module("skin_client")
    finally:
        sys.path.remove(str(folder))
        for name in [name for name in sys.modules if name.partition(".")[0] == "skin_client"]:
            del sys.modules[name]


def problem_of(skin, call, *args):
    """Return the problem details the generated client ``skin`` decoded from the failure of ``call``."""
    with pytest.raises(skin.ApiException) as failure:
        call(*args)
    problem = failure.value.data
    assert isinstance(problem, skin.Problem), failure.value
    assert problem.status == failure.value.status and problem.type == "about:blank"
    return problem.code


def round_trip(skin, server, prefix):
    """Upload, retry, analyze, inspect and delete through the generated client ``skin``, errors included."""
    config = skin.Configuration(host=server.url + prefix, api_key={"ApiKeyAuth": KEY})
    with skin.ApiClient(config) as client:
        images, analysis = skin.ImagesApi(client), skin.AnalysisApi(client)
        assert skin.HealthApi(client).get_health().status == "healthy"

        photo, key = ("photo.jpg", make_jpeg(320, 240)), str(uuid.uuid4())
        first = images.upload_image_with_http_info(file=photo, idempotency_key=key)
        uploaded, image_id = first.data, first.data.image_id
        assert first.status_code == 201 and first.headers["Location"] == f"{prefix}/images/{image_id}"
        assert uploaded.content_type.value == "image/jpeg" and (uploaded.width, uploaded.height) == (320, 240)
        retry = images.upload_image_with_http_info(file=photo, idempotency_key=key)
        assert retry.data == uploaded and retry.headers["Idempotent-Replayed"] == "true"
        assert images.upload_image(file=("photo.png", make_png())).content_type.value == "image/png"

        result = analysis.analyze_image(skin.AnalyzeRequest(image_id=image_id))
        assert result.image_id == image_id and 0.7 <= result.confidence <= 0.99
        assert analysis.analyze_image(skin.AnalyzeRequest(image_id=image_id)) == result
        assert analysis.analyze_image(skin.AnalyzeRequest(image_id="mock_oily")).skin_type.value == "Oily"
        metadata = images.get_image(image_id)
        assert metadata.analyzed and metadata.size_bytes == uploaded.size_bytes
        assert images.delete_image_with_http_info(image_id).status_code == 204

        assert problem_of(skin, images.get_image, image_id) == "image_not_found"
        assert problem_of(skin, images.delete_image, image_id) == "image_not_found"
        unknown = skin.AnalyzeRequest(image_id=REAL_ID)
        assert problem_of(skin, analysis.analyze_image, unknown) == "image_not_found"
        assert problem_of(skin, images.upload_image, ("a.png", b"not an image")) == "unsupported_type"
        # The document's pattern reached the client, which refuses the id before sending it.
        with pytest.raises(ValueError, match="image_id"):
            skin.AnalyzeRequest(image_id="../etc/passwd")

    config = skin.Configuration(host=server.url + prefix, api_key={"ApiKeyAuth": "not-a-key"})
    with skin.ApiClient(config) as client:
        assert problem_of(skin, skin.ImagesApi(client).get_image, REAL_ID) == "unauthorized"


@pytest.mark.slow
def test_a_generated_python_client_round_trips_under_every_server(generated_client, server):
    for entry in DOCUMENT["servers"]:
        round_trip(generated_client, server, entry["url"].rstrip("/"))
