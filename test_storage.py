"""Tests of the registry, on the uploads folder and on a bucket: whole or absent, one winner, clean deletes."""

import errno
import fcntl
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

import storage
from app import create_app
from conftest import (
    HERE,
    KEY,
    LOCATING_SEGMENTS,
    MINIMAL_EXIF,
    BucketStore,
    age,
    analyze,
    assert_problem,
    delete,
    exif_segment,
    exif_tiff,
    make_jpeg,
    unique_jpeg,
    upload,
    upload_once,
)

# --- whole or absent --------------------------------------------------------------


@pytest.mark.folder
@pytest.mark.parametrize("errno_name, status", [("ENOSPC", 507), ("EIO", 503)])
def test_storage_failure_leaves_nothing_behind(client, uploads, monkeypatch, errno_name, status):
    def fail(fd):
        raise OSError(getattr(errno, errno_name), os.strerror(getattr(errno, errno_name)))

    monkeypatch.setattr(storage.os, "fsync", fail)
    body = assert_problem(upload(client, make_jpeg()), status, "storage_unavailable")
    assert str(uploads) not in json.dumps(body)
    assert list(uploads.iterdir()) == []


@pytest.mark.folder
@pytest.mark.parametrize("size", [5_000, 1_000_000], ids=["in memory", "spooled"])
def test_failed_folder_sync_takes_the_upload_back(client, uploads, monkeypatch, size):
    def fail():
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(storage.Folder, "_sync_folder", lambda self: fail())
    assert_problem(upload(client, make_jpeg(size=size)), 503, "storage_unavailable")
    assert list(uploads.iterdir()) == []


@pytest.mark.folder
def test_unfinished_uploads_are_ignored_and_removed_at_start(make_app, uploads, store):
    leftover = uploads / f"{storage.TEMP_PREFIX}{uuid.uuid4().hex}"
    leftover.write_bytes(make_jpeg()[:100])
    client = make_app().test_client()
    assert not leftover.exists()
    assert store.names() == []
    assert analyze(client, str(uuid.uuid4())).status_code == 404


@pytest.mark.folder
def test_a_keyed_upload_into_a_vanished_folder_is_503(client, uploads):
    shutil.rmtree(uploads)
    assert_problem(upload_once(client, make_jpeg(), "k"), 503, "storage_unavailable")


# --- one winner ---------------------------------------------------------------------


def test_first_analyses_at_once_agree_on_one_record(make_app, store):
    """Threads of one app stand for workers and instances: one record, every answer the same."""
    app = make_app()
    image_id = upload(app.test_client(), make_jpeg()).get_json()["image_id"]
    registry, barrier = app.extensions["registry"], threading.Barrier(8)

    def first_analysis(n):
        barrier.wait()
        return registry.analysis(image_id, lambda image_id: f'{{"by": {n}}}\n'.encode())

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(first_analysis, range(8)))
    assert len({record for record, _ in results}) == 1 and sum(created for _, created in results) == 1
    assert store.analysis(image_id) == results[0][0]


def test_registries_starting_together_agree_on_the_generated_key(store):
    """Every worker and instance generates a key at first start; exactly one is kept."""
    from app import _make_registry, _parse_config, DEFAULTS  # the registry exactly as the factory makes it

    config = _parse_config({**DEFAULTS, **store.env})
    registries = [_make_registry(config, store.env) for _ in range(8)]
    barrier = threading.Barrier(8)

    def start(registry):
        barrier.wait()
        return registry.api_key()[0]

    with ThreadPoolExecutor(8) as pool:
        keys = set(pool.map(start, registries))
    assert len(keys) == 1 and len(keys.pop()) >= storage.MIN_KEY_LENGTH


# --- safe retries --------------------------------------------------------------------


def test_a_retry_during_the_first_upload_is_a_conflict(make_app, monkeypatch):
    app = make_app()
    registry = app.extensions["registry"]
    inside, release = threading.Event(), threading.Event()
    real_store = registry._store

    def slow_store(*args):
        inside.set()
        release.wait(10)
        return real_store(*args)

    monkeypatch.setattr(registry, "_store", slow_store)
    data = unique_jpeg(20_000)
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(upload_once, app.test_client(), data, "k")
        assert inside.wait(10)
        assert_problem(upload_once(app.test_client(), data, "k"), 409, "idempotency_conflict")
        release.set()
        assert first.result().status_code == 201
    assert upload_once(app.test_client(), data, "k").data == first.result().data


def test_a_crash_between_the_key_and_the_image_does_not_make_two_images(make_app, store, monkeypatch, clock):
    app = make_app()
    registry = app.extensions["registry"]
    data = unique_jpeg(20_000)
    with monkeypatch.context() as patch:
        patch.setattr(
            registry, "_store", lambda *args: (_ for _ in ()).throw(storage.StorageUnavailable("down"))
        )
        assert_problem(upload_once(app.test_client(), data, "k"), 503, "storage_unavailable")
    assert store.image_names() == []
    clock(120)  # in a bucket, the crashed upload's lease has run out by now
    retried = upload_once(app.test_client(), data, "k")
    assert retried.status_code == 201 and "Idempotent-Replayed" not in retried.headers
    assert upload_once(app.test_client(), data, "k").headers["Idempotent-Replayed"] == "true"
    assert store.image_names() == [retried.get_json()["image_id"] + ".jpg"]


def test_keys_are_forgotten_after_their_time(make_app, clock):
    client = make_app(IDEMPOTENCY_TTL_HOURS="1").test_client()
    data = unique_jpeg(20_000)
    first = upload_once(client, data, "k").get_json()["image_id"]
    clock(3601)
    second = upload_once(client, data, "k")
    assert "Idempotent-Replayed" not in second.headers and second.get_json()["image_id"] != first


@pytest.mark.folder
def test_a_delete_waits_for_an_upload_holding_its_key_but_not_for_ever(client, uploads, monkeypatch, store):
    image_id = upload_once(client, make_jpeg(), "k").get_json()["image_id"]
    (record,) = uploads.glob(storage.IDEMPOTENCY_PREFIX + "*")
    monkeypatch.setattr(storage, "LOCK_WAIT_SECONDS", 0.2)
    with open(record, "rb") as held:
        fcntl.flock(held, fcntl.LOCK_EX)  # as an upload with that key would
        assert "busy" in assert_problem(delete(client, image_id), 503, "storage_unavailable")["detail"]
    assert delete(client, image_id).status_code == 204
    assert store.names() == []


# --- deletes ---------------------------------------------------------------------------


def test_an_analysis_racing_a_delete_is_never_left_behind(make_app, store, monkeypatch):
    app = make_app()
    registry = app.extensions["registry"]
    image_id = upload(app.test_client(), make_jpeg()).get_json()["image_id"]
    real_has_image, checks = registry._has_image, []

    def delete_meanwhile(image_id):
        checks.append(image_id)
        if len(checks) == 2:  # the worst moment: the record written, the image not checked again yet
            assert delete(app.test_client(), image_id).status_code == 204
        return real_has_image(image_id)

    monkeypatch.setattr(registry, "_has_image", delete_meanwhile)
    assert_problem(analyze(app.test_client(), image_id), 404, "image_not_found")
    assert len(checks) == 2 and store.names() == []


def test_a_delete_clears_what_an_interrupted_delete_left(client, store):
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    analyze(client, image_id)
    store.drop_image(image_id)  # a crash between removing the image and its analysis
    assert_problem(delete(client, image_id), 404, "image_not_found")
    assert store.names() == []


def test_deleting_an_image_forgets_its_key(client, store):
    data = unique_jpeg(20_000)
    first = upload_once(client, data, "k").get_json()["image_id"]
    assert delete(client, first).status_code == 204
    assert store.names() == []
    second = upload_once(client, data, "k")
    assert second.status_code == 201 and second.get_json()["image_id"] != first


def test_deleting_an_image_whose_key_expired_leaves_no_record(make_app, store, clock):
    app = make_app(IDEMPOTENCY_TTL_HOURS="1")
    image_id = upload_once(app.test_client(), unique_jpeg(20_000), "k").get_json()["image_id"]
    clock(7200)
    app.test_cli_runner().invoke(args=["purge", "--older-than", "1"])  # removes the expired record
    assert delete(app.test_client(), image_id).status_code == 204
    assert store.names() == []


# --- retention ---------------------------------------------------------------------------


def test_purge_deletes_what_was_uploaded_before_its_time(make_app, store):
    app = make_app()
    client = app.test_client()
    old = upload_once(client, unique_jpeg(5_000), "k-old").get_json()["image_id"]
    analyze(client, old)
    cutoff = int(time.time()) + 1  # a bucket keeps upload times to the second
    time.sleep(cutoff - time.time() + 0.1)  # and a file's clock may lag by a tick
    recent = upload(client, unique_jpeg(5_000)).get_json()["image_id"]
    registry = app.extensions["registry"]
    assert [image_id for image_id, _ in registry.purge(cutoff, dry_run=True)] == [old]
    assert [image_id for image_id, _ in registry.purge(cutoff)] == [old]
    assert store.image_names() == [f"{recent}.jpg"] and store.names() == [f"{recent}.jpg"]
    assert upload_once(client, unique_jpeg(5_000), "k-old").status_code == 201  # its key went with it


def test_the_purge_command_deletes_past_the_retention_age(make_app, store, monkeypatch):
    app = make_app(RETENTION_DAYS="30")
    image_id = upload(app.test_client(), make_jpeg()).get_json()["image_id"]
    runner = app.test_cli_runner()
    assert "nothing" in runner.invoke(args=["purge"]).output.lower()
    later = time.time() + 31 * 86400
    monkeypatch.setattr("app.time.time", lambda: later)
    listed = runner.invoke(args=["purge", "--dry-run"])
    assert listed.exit_code == 0 and f"would delete {image_id}" in listed.output
    assert store.image_names() == [f"{image_id}.jpg"]
    deleted = runner.invoke(args=["purge"])
    assert deleted.exit_code == 0 and f"deleted {image_id}" in deleted.output
    assert "1 image deleted" in deleted.output and store.names() == []


@pytest.mark.folder
@pytest.mark.parametrize("dry_run", [False, True], ids=["purge", "dry-run"])
def test_purge_deletes_what_is_past_the_retention_age(make_app, uploads, dry_run, store):
    app = make_app(RETENTION_DAYS="30")
    client = app.test_client()
    old, recent = (upload_once(client, unique_jpeg(5_000), f"k{n}").get_json()["image_id"] for n in range(2))
    analyze(client, old)
    age(uploads, old, 31)
    age(uploads, recent, 29)
    before = store.names()
    result = app.test_cli_runner().invoke(args=["purge", *(["--dry-run"] if dry_run else [])])
    assert result.exit_code == 0, result.output
    assert old in result.output and recent not in result.output
    if dry_run:
        assert store.names() == before
    else:
        assert not [name for name in store.names() if old in name]
        assert client.get(f"/images/{recent}", headers={"X-API-Key": KEY}).status_code == 200
        assert upload_once(client, unique_jpeg(5_000), "k0").status_code == 201  # its key went with it


@pytest.mark.folder
def test_purge_older_than_overrides_the_setting(make_app, uploads, store):
    app = make_app()
    image_id = upload(app.test_client(), make_jpeg()).get_json()["image_id"]
    age(uploads, image_id, 3)
    assert "nothing" in app.test_cli_runner().invoke(args=["purge", "--older-than", "4"]).output.lower()
    result = app.test_cli_runner().invoke(args=["purge", "--older-than", "2"])
    assert result.exit_code == 0 and image_id in result.output
    assert store.names() == []


def test_purge_clears_old_leftovers_of_crashes(make_app, store, clock):
    app = make_app()
    client = app.test_client()
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    analyze(client, image_id)
    store.drop_image(image_id)  # as a crash in a delete would leave it
    app.test_cli_runner().invoke(args=["purge", "--older-than", "1"])
    assert store.names() == [f"{image_id}.json"]  # recent: it may belong to an upload in progress
    clock(storage.LEFTOVER_AGE + 60)
    app.test_cli_runner().invoke(args=["purge", "--older-than", "1"])
    assert store.names() == []


def test_purge_removes_expired_idempotency_records(make_app, store, clock):
    app = make_app(IDEMPOTENCY_TTL_HOURS="1")
    upload_once(app.test_client(), unique_jpeg(5_000), "k")
    (record,) = [name for name in store.names() if name.startswith(storage.IDEMPOTENCY_PREFIX)]
    app.test_cli_runner().invoke(args=["purge", "--older-than", "1"])
    assert record in store.names()  # still within its hour
    clock(7200)
    app.test_cli_runner().invoke(args=["purge", "--older-than", "1"])
    assert record not in store.names() and len(store.image_names()) == 1


@pytest.mark.folder
def test_purge_removes_temporary_files_a_crash_left(make_app, uploads):
    app = make_app()
    old, recent = (uploads / f"{storage.TEMP_PREFIX}{uuid.uuid4().hex}" for _ in range(2))
    for path in (old, recent):
        path.write_bytes(b"half an image")
    when = time.time() - storage.LEFTOVER_AGE - 60  # live uploads write at least every CLIENT_TIMEOUT
    os.utime(old, (when, when))
    app.test_cli_runner().invoke(args=["purge", "--older-than", "1"])
    assert not old.exists() and recent.exists()


def test_purge_needs_an_age(make_app):
    result = make_app().test_cli_runner().invoke(args=["purge"])
    assert result.exit_code != 0 and "RETENTION_DAYS" in result.output


@pytest.mark.folder
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


# --- a bucket only ------------------------------------------------------------------------


def bucket_settings(s3, **changes):
    return {
        "STORAGE_URL": f"s3://{s3.bucket}/start-{uuid.uuid4().hex[:8]}",
        **s3.env,
        "API_KEY": KEY,
        **changes,
    }


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"STORAGE_URL": "s3://no-such-bucket-here"}, "does not exist"),
        ({"AWS_SECRET_ACCESS_KEY": "wrong-secret-0123456789"}, "credentials are refused"),
        ({"AWS_ACCESS_KEY_ID": "nobody"}, "credentials are refused"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "cannot be reached"),  # the discard port: nothing
    ],
    ids=["missing bucket", "wrong secret", "unknown access key", "unreachable endpoint"],
)
def test_an_unusable_bucket_stops_the_start_with_one_message(s3, changes, message):
    settings = bucket_settings(s3, **changes)
    started = time.monotonic()
    with pytest.raises(SystemExit) as stopped:
        create_app(settings)
    assert time.monotonic() - started < 5
    text = str(stopped.value)
    assert text.startswith("Configuration error: ") and message in text
    assert settings["AWS_SECRET_ACCESS_KEY"] not in text


@pytest.mark.parametrize(
    "url", ["s3://", "s3://ab", "s3://Upper-Case", "gs://bucket", "s3://bucket name", "https://bucket"]
)
def test_a_malformed_storage_url_stops_the_start(s3, url):
    with pytest.raises(SystemExit, match="STORAGE_URL must look like s3://BUCKET"):
        create_app(bucket_settings(s3, STORAGE_URL=url))


def test_the_uploads_folder_never_loads_the_s3_client(uploads):
    code = "import sys, app; app.create_app({'UPLOAD_DIR': sys.argv[1], 'API_KEY': 'k'}); print('boto3' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code, str(uploads)], cwd=HERE, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_what_is_stored_in_a_bucket_is_private(s3):
    store = BucketStore(s3)
    client = create_app({**store.env, "API_KEY": KEY}).test_client()
    image_id = upload(client, make_jpeg()).get_json()["image_id"]
    analyze(client, image_id)
    for key in store.keys():  # what an anonymous reader of the bucket gets
        assert requests.get(f"{s3.endpoint}/{store.name}/{store.prefix}{key}", timeout=5).status_code == 403
    assert {
        grant["Permission"]
        for grant in store.client.get_object_acl(Bucket=store.name, Key=f"{store.prefix}images/{image_id}")[
            "Grants"
        ]
    } <= {"FULL_CONTROL"}


def test_an_image_is_described_without_downloading_it(s3, monkeypatch):
    store = BucketStore(s3)
    app = create_app({**store.env, "API_KEY": KEY})
    image_id = upload(app.test_client(), make_jpeg(640, 480)).get_json()["image_id"]
    registry, operations = app.extensions["registry"], []
    real_call = registry._call
    monkeypatch.setattr(
        registry,
        "_call",
        lambda operation, *args, **kwargs: (
            operations.append(operation),
            real_call(operation, *args, **kwargs),
        )[1],
    )
    body = app.test_client().get(f"/images/{image_id}", headers={"X-API-Key": KEY}).get_json()
    assert (body["width"], body["height"], body["content_type"]) == (640, 480, "image/jpeg")
    assert operations == ["head_object", "head_object"]  # the image's metadata, and whether it was analyzed


def run_purge(uploads, *args, terminal=False):
    """Run the flask command as an operator or cron does: on a terminal, or piped."""
    command = [sys.executable, "-m", "flask", "--app", "app", "purge", *args]
    env = {**os.environ, "UPLOAD_DIR": str(uploads), "API_KEY": KEY, "TERM": "xterm"}
    if not terminal:
        return subprocess.run(command, cwd=HERE, env=env, capture_output=True, text=True, timeout=60).stdout
    import pty

    leader, follower = pty.openpty()
    process = subprocess.Popen(command, cwd=HERE, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the command is done and the terminal closed
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert process.wait(60) == 0
    return output.decode(errors="replace")


@pytest.mark.folder
def test_purge_shows_a_count_on_a_terminal_and_one_line_per_image_when_piped(make_app, uploads):
    client = make_app().test_client()
    image_ids = [upload(client, unique_jpeg(2_000)).get_json()["image_id"] for _ in range(6)]
    for image_id in image_ids:
        age(uploads, image_id, 3)
    listed = run_purge(uploads, "--older-than", "2", "--dry-run", terminal=True)  # a list to read
    assert all(image_id in listed for image_id in image_ids) and "6 images would be deleted" in listed
    watched = run_purge(uploads, "--older-than", "2", terminal=True)
    assert "Purging" in watched and "6 images deleted" in watched
    assert not any(image_id in watched for image_id in image_ids)
    for _ in range(2):
        image_ids.append(upload(client, unique_jpeg(2_000)).get_json()["image_id"])
        age(uploads, image_ids[-1], 3)
    logged = run_purge(uploads, "--older-than", "2").splitlines()  # as cron keeps it
    assert sorted(line.split()[1] for line in logged if line.startswith("deleted ")) == sorted(image_ids[-2:])
    assert logged[-1] == "2 images deleted: uploaded more than 2 days ago."


# --- one folder fsync for the uploads that land together ----------------------------------


def test_one_folder_fsync_covers_the_threads_that_need_one_together(tmp_path, monkeypatch):
    group, log, lock = storage.GroupSync(tmp_path), [], threading.Lock()

    def slow_fsync():
        with lock:
            log.append(("start", time.monotonic()))
        time.sleep(0.05)

    monkeypatch.setattr(group, "_fsync", slow_fsync)
    arrived = {}

    def changed_then_synced(n):
        arrived[n] = time.monotonic()
        group.sync()
        return n, time.monotonic()

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(changed_then_synced, range(48)))
    starts = [when for kind, when in log]
    assert 2 <= len(starts) < 24  # shared, yet more than one
    for n, returned in results:  # every caller waited for an fsync that began after it asked
        assert any(arrived[n] <= start and start + 0.05 <= returned for start in starts)


def test_a_failed_folder_fsync_fails_the_threads_it_was_for(tmp_path, monkeypatch):
    group, calls = storage.GroupSync(tmp_path), []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise OSError(5, "Input/output error")

    monkeypatch.setattr(group, "_fsync", failing_once)
    with pytest.raises(OSError):
        group.sync()
    group.sync()  # the next one succeeds
    assert len(calls) == 2


@pytest.mark.folder
@pytest.mark.parametrize("trailer", [b"", b"ftypmp42 a motion photo's video"], ids=["photo", "motion photo"])
def test_a_large_photo_is_written_once_without_its_metadata(make_app, store, monkeypatch, trailer):
    """Its header loses its metadata before it reaches the spool, which then becomes the image by a rename."""
    app = make_app()
    registry, written = app.extensions["registry"], []
    real_write = registry._write_file
    monkeypatch.setattr(
        registry, "_write_file", lambda path, *args: (written.append(path), real_write(path, *args))[1]
    )
    metadata = exif_segment(exif_tiff()) + b"".join(LOCATING_SEGMENTS)
    sent = make_jpeg(segments=[metadata], size=2_000_000) + trailer
    image_id = upload(app.test_client(), sent).get_json()["image_id"]
    assert store.image(image_id) == sent[: len(sent) - len(trailer)].replace(
        metadata, exif_segment(MINIMAL_EXIF["<"])
    )
    assert not [path for path in written if image_id in path]


def test_a_header_sent_a_byte_at_a_time_is_not_parsed_once_a_byte(tmp_path, monkeypatch):
    """A crafted header of a thousand segments, trickled, must not cost a parse per byte."""
    parses = []
    real = storage.images.strip_header
    monkeypatch.setattr(storage.images, "strip_header", lambda head: (parses.append(1), real(head))[1])
    spool = storage.Spool(str(tmp_path), named=True, size=5_000_000)
    head = b"\xff\xd8" + b"\xff\xe5\x00\x02" * 1100
    trickled = head + bytes(20_000)
    for byte in range(len(trickled)):
        spool.write(trickled[byte : byte + 1])
    assert len(parses) <= 20 and not spool.in_file  # still no header it can decide on
    spool.write(bytes(storage.SPOOL_BYTES))
    assert spool.in_file and spool.size == len(head) + 20_000 + storage.SPOOL_BYTES
    spool.close()
