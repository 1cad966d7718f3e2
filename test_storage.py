"""Tests of the registry: durable, whole-or-absent storage, idempotency records, deletes and purge."""

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

import storage
from conftest import (
    HERE,
    KEY,
    age,
    analyze,
    assert_problem,
    delete,
    image_names,
    make_jpeg,
    stored_files,
    unique_jpeg,
    upload,
    upload_once,
)


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

    monkeypatch.setattr(storage.Folder, "_sync_folder", lambda self: fail())
    assert_problem(upload(client, make_jpeg()), 503, "storage_unavailable")
    assert list(uploads.iterdir()) == []


def test_unfinished_uploads_are_ignored_and_removed_at_start(make_app, uploads):
    leftover = uploads / f"{storage.TEMP_PREFIX}{uuid.uuid4().hex}"
    leftover.write_bytes(make_jpeg()[:100])
    client = make_app().test_client()
    assert not leftover.exists()
    assert stored_files(uploads) == []
    assert analyze(client, str(uuid.uuid4())).status_code == 404


def test_analysis_racing_a_delete_is_never_left_behind(make_app, uploads, monkeypatch):
    app = make_app()
    folder = app.extensions["registry"]
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


def test_a_retry_during_the_first_upload_is_a_conflict(make_app, uploads, monkeypatch):
    app = make_app()
    folder = app.extensions["registry"]
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
    folder = app.extensions["registry"]
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
