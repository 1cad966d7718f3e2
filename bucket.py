"""The registry in an S3-compatible bucket, for platforms with ephemeral disks and for many instances.

Imported only when STORAGE_URL names a bucket, so the uploads folder never loads the S3 client.
Every rule of storage.Registry holds across instances: first writers win with conditional
writes (If-None-Match, If-Match on the ETag read), and an idempotency key's upload holds a
lease with an expiry in its record instead of a lock.
"""

import json
import os
import secrets
import tempfile
import threading
import time
import uuid
from datetime import timezone

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

import images
import storage

IMAGES, ANALYSES, IDEMPOTENCY, KEY_OBJECT = "images/", "analyses/", "idempotency/", "api-key"
# How long an upload with an idempotency key holds it: longer than a 5 MiB PUT can take within
# the client's timeouts and retries, after which a retry takes over an upload that crashed.
LEASE_SECONDS = 60
# Every call is bounded, so a slow or absent bucket makes a request fail (503) within about
# 10 s, under a router's 30 s, and never holds a thread for ever: two attempts of at most 2 s to
# connect and 3 s between bytes of the answer (and 1 s for a PUT's 100 Continue). Requests use
# the bucket two at a time per worker (the admission gate), but a small upload gives its turn away
# while it is stored, so up to every thread of a worker may be in a call: the pool has room for
# GUNICORN_THREADS' default of 64 (connections are opened only when needed).
CLIENT_CONFIG = {
    "connect_timeout": 2,
    "read_timeout": 3,
    "retries": {"total_max_attempts": 2, "mode": "standard"},
    "max_pool_connections": 64,
    # The body is not hashed for the signature (0.6 ms of CPU per MiB): its CRC32, which the
    # server checks, already guards it, and over https the connection does too.
    "s3": {"payload_signing_enabled": False},
}
# The health check fails fast instead, in one attempt: the platform asks again soon enough.
PROBE_CONFIG = {
    **CLIENT_CONFIG,
    "connect_timeout": 1,
    "read_timeout": 1,
    "retries": {"total_max_attempts": 1},
}
UNAVAILABLE = "The bucket could not be reached, or refused the request; retry later."


class Bucket(storage.Registry):
    """Images as ``images/<id>`` (type, width and height in the object's metadata), analyses as
    ``analyses/<id>.json``, idempotency records as ``idempotency/<digest>.json`` and the generated
    API key as ``api-key``, all under one prefix of one bucket.
    """

    def __init__(
        self, name, prefix="", idempotency_ttl=24 * 3600, endpoint_url=None, credentials=None, region=None
    ):
        self.name = name
        self.prefix = prefix
        self.idempotency_ttl = idempotency_ttl
        # Unset, boto3 finds them itself: the environment, ~/.aws, an instance or task role.
        self._options = {key: value for key, value in (credentials or {}).items() if value}
        self._options.update(region_name=region, endpoint_url=endpoint_url)
        self._endpoint_url = endpoint_url
        self._clients = {}

    # --- the clients ------------------------------------------------------------

    def _client(self, config=CLIENT_CONFIG):
        """This process's client (thread-safe): made after a fork, never sharing the master's sockets."""
        key = (os.getpid(), id(config))
        client = self._clients.get(key)
        if client is None:
            with _LOCK:
                client = self._clients.get(key)
                if client is None:
                    client = _session().client("s3", config=Config(**config), **self._options)
                    self._clients = {k: c for k, c in self._clients.items() if k[0] == key[0]}
                    self._clients[key] = client
        return client

    def _call(self, operation, config=CLIENT_CONFIG, **params):
        """Call the bucket; return the answer, or None when the key does not exist or a condition failed.

        ``params`` name the object by ``key`` (under the prefix). Anything else that goes
        wrong is StorageUnavailable, with no detail that could hold a secret.
        """
        if "key" in params:
            params["Key"] = self.prefix + params.pop("key")
        try:
            return getattr(self._client(config), operation)(Bucket=self.name, **params)
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = error.response.get("Error", {}).get("Code")
            # No such key, or a condition that did not hold (409: a concurrent conditional write).
            if status in (404, 412) and code != "NoSuchBucket" or code == "ConditionalRequestConflict":
                return None
            raise storage.StorageUnavailable(UNAVAILABLE) from error
        except BotoCoreError as error:  # unreachable, timed out, no credentials
            raise storage.StorageUnavailable(UNAVAILABLE) from error

    def open(self, clean):
        """Check that the bucket exists and the credentials work."""
        try:
            self._client(PROBE_CONFIG).head_bucket(Bucket=self.name)
        except ClientError as error:
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status == 404:
                raise storage.StorageUnavailable(f"the bucket {self.name!r} does not exist") from None
            if status in (401, 403):
                raise storage.StorageUnavailable(
                    f"the credentials are refused for the bucket {self.name!r}"
                    f" ({error.response.get('Error', {}).get('Code', status)})"
                ) from None
            raise storage.StorageUnavailable(f"the bucket answered {status}") from None
        except BotoCoreError as error:
            raise storage.StorageUnavailable(
                f"the bucket cannot be reached ({type(error).__name__})"
            ) from None
        return 0  # what an interrupted upload leaves is only in a worker's temporary folder

    def describe(self):
        return f"bucket s3://{self.name}/{self.prefix}" + (
            f" at {self._endpoint_url}" if self._endpoint_url else ""
        )

    def check(self):
        if self._call("head_bucket", PROBE_CONFIG) is None:
            raise storage.StorageUnavailable(UNAVAILABLE)

    def spool(self, size, fingerprinted):
        return storage.Spool(tempfile.gettempdir(), named=False, size=size, fingerprinted=fingerprinted)

    def api_key(self):
        where = f"s3://{self.name}/{self.prefix}{KEY_OBJECT}"
        key = self._read(KEY_OBJECT)
        if key is None:
            # Instances starting together each try; the conditional write lets exactly one win.
            self._call("put_object", key=KEY_OBJECT, Body=secrets.token_urlsafe(32).encode(), IfNoneMatch="*")
            key = self._read(KEY_OBJECT)
        return (key or b"").decode("ascii", "replace").strip(), where

    # --- images -------------------------------------------------------------------

    def save_image(self, upload, idempotency_key=None):
        """Store an upload under a new id with one PUT (see Registry.save_image).

        With a key, its record is created (or taken over) conditionally before the image is
        stored, holding a lease that a retry respects: 409 while it lasts, and after it the
        retry stores the image under the recorded id, so one key never makes two images.
        """
        with upload.view() as data:
            info = images.inspect(data)
            if idempotency_key is None:
                return self._store(str(uuid.uuid4()), upload, data, info, None), False
            sent = upload.fingerprint()
            image_id, replay = self._claim(idempotency_key, sent)
            if replay:
                return self.image(image_id), True
            return self._store(image_id, upload, data, info, idempotency_key), False

    def _claim(self, digest, sent):
        """Return ``(image_id, replayed)`` for an upload under an idempotency key, claiming it if it is new."""
        key, claim = f"{IDEMPOTENCY}{digest}.json", secrets.token_hex(8)
        for _ in range(3):  # a loser of a race reads the winner's record
            record, etag = self._read_record(key)
            now = time.time()
            if record is None:
                claimed = {
                    "image_id": str(uuid.uuid4()),
                    "sha256": sent,
                    "created_at": int(now),
                    "claim": claim,
                }
                if self._write_record(key, {**claimed, "lease_until": now + LEASE_SECONDS}, etag):
                    return claimed["image_id"], False
                continue
            if record.get("claim") == claim:  # our own write, answered 412 only when retried after a timeout
                return record["image_id"], False
            if record["sha256"] != sent:
                raise storage.IdempotencyKeyReused(
                    "This Idempotency-Key was already used for a different file."
                )
            if self._has_image(record["image_id"]):
                return record["image_id"], True
            if record.get("lease_until", 0) > now:
                break
            # The first upload stopped before its image was stored: finish it under the same id.
            if self._write_record(key, {**record, "claim": claim, "lease_until": now + LEASE_SECONDS}, etag):
                return record["image_id"], False
            break
        raise storage.IdempotencyConflict(
            "An upload with this Idempotency-Key is still in progress; retry it later."
        )

    def _read_record(self, key):
        """An idempotency record and its ETag; the record is None when absent, expired or deleted."""
        answer = self._call("get_object", key=key)
        if answer is None:
            return None, None
        try:
            record = json.loads(answer["Body"].read())
        except (ValueError, BotoCoreError, OSError):
            record = None
        return storage.live_idempotency_record(record, self.idempotency_ttl), answer["ETag"]

    def _write_record(self, key, record, etag):
        """Write a record only if the one read (``etag``; None: no record at all) is still there."""
        condition = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        return self._call("put_object", key=key, Body=json.dumps(record).encode(), **condition) is not None

    def _store(self, image_id, upload, data, info, digest):
        pieces = images.strip_location(data, info.content_type, release=upload.release)
        metadata = {"width": str(info.width), "height": str(info.height)}
        if digest:
            metadata["idempotency-key"] = digest  # so that deleting the image also forgets its key
        # What is stored goes to the bucket from a local file, read a piece at a time: an upload
        # holds no more memory for being large.
        with tempfile.TemporaryFile(buffering=0) as body:
            upload.write_to(body.fileno(), pieces)
            body.seek(0)
            self._call(
                "put_object",
                key=IMAGES + image_id,
                Body=body,
                ContentType=info.content_type,
                Metadata=metadata,
            )
        size = storage.stored_size(upload, pieces)
        return storage.StoredImage(image_id, info.content_type, size, info.width, info.height)

    def _head(self, image_id):
        return self._call("head_object", key=IMAGES + image_id)

    def _has_image(self, image_id):
        return self._head(image_id) is not None

    def image(self, image_id):
        head = self._head(image_id)
        if head is None:
            raise storage.ImageNotFound(f"No image with id {image_id} exists.")
        metadata = head.get("Metadata", {})
        try:
            width, height = int(metadata["width"]), int(metadata["height"])
        except (KeyError, ValueError) as error:  # not an object this service stored
            raise storage.StorageUnavailable("The stored image is damaged.") from error
        return storage.StoredImage(
            image_id,
            head["ContentType"],
            head["ContentLength"],
            width,
            height,
            uploaded_at=head["LastModified"].astimezone(timezone.utc).replace(microsecond=0),
            analyzed=self._call("head_object", key=f"{ANALYSES}{image_id}.json") is not None,
        )

    def delete(self, image_id):
        head = self._head(image_id)
        digest = (head or {}).get("Metadata", {}).get("idempotency-key", "")
        tombstone = (
            self._forget(f"{IDEMPOTENCY}{digest}.json", image_id)
            if storage.DIGEST.fullmatch(digest)
            else None
        )
        # The image before its analysis: an analysis written meanwhile sees it gone and removes
        # itself. Also when there was no image: what a crash in an earlier delete left goes now.
        if head is not None:
            self._call("delete_object", key=IMAGES + image_id)
        self._call("delete_object", key=f"{ANALYSES}{image_id}.json")
        if tombstone:  # unless a new upload under the same key has replaced it meanwhile
            self._call("delete_object", key=f"{IDEMPOTENCY}{digest}.json", IfMatch=tombstone)
        if head is None:
            raise storage.ImageNotFound(f"No image with id {image_id} exists.")

    def _forget(self, key, image_id):
        """Mark an image's idempotency record deleted before the image goes; return the mark's ETag.

        With the mark in place, a retry of the upload can no longer take the record over and
        store the image again once it is gone: its conditional write fails.
        """
        for _ in range(3):
            record, etag = self._read_record(key)
            if record is None or record["image_id"] != image_id:
                return None
            answer = self._call("put_object", key=key, Body=b'{"deleted": true}', IfMatch=etag)
            if answer is not None:
                return answer["ETag"]
        raise storage.StorageUnavailable("The image is busy with another request; retry later.")

    # --- analyses -------------------------------------------------------------------

    def analysis(self, image_id, analyze):
        record = self.stored_analysis(image_id)
        if record is not None:
            return record, False
        if not self._has_image(image_id):
            raise storage.ImageNotFound(f"No image with id {image_id} exists.")
        record = analyze(image_id)
        key = f"{ANALYSES}{image_id}.json"
        created = self._call(
            "put_object", key=key, Body=record, ContentType="application/json", IfNoneMatch="*"
        )
        if not self._has_image(image_id):  # deleted meanwhile: leave no analysis behind
            self._call("delete_object", key=key)
            raise storage.ImageNotFound(f"No image with id {image_id} exists.")
        if created is not None:
            return record, True
        # Another instance stored it first: theirs is the record of this image.
        stored = self.stored_analysis(image_id)
        if stored is None:
            raise storage.ImageNotFound(f"No image with id {image_id} exists.")
        return stored, False

    def stored_analysis(self, image_id):
        return self._read(f"{ANALYSES}{image_id}.json")

    def _read(self, key):
        answer = self._call("get_object", key=key)
        if answer is None:
            return None
        try:
            return answer["Body"].read()
        except (BotoCoreError, OSError) as error:
            raise storage.StorageUnavailable("The bucket could not be read.") from error

    # --- retention ----------------------------------------------------------------------

    def purge(self, uploaded_before, dry_run=False):
        for entry in self._list(IMAGES):
            image_id = entry["Key"][len(self.prefix + IMAGES) :]
            uploaded_at = entry["LastModified"].astimezone(timezone.utc).replace(microsecond=0)
            if not storage.is_image_id(image_id) or uploaded_at.timestamp() >= uploaded_before:
                continue
            if dry_run:
                yield image_id, uploaded_at
                continue
            try:
                self.delete(image_id)
            except storage.ImageNotFound:  # deleted meanwhile
                continue
            yield image_id, uploaded_at
        if dry_run:
            return
        for entry in self._list(IDEMPOTENCY):
            if entry["LastModified"].timestamp() < time.time() - self.idempotency_ttl:
                key = entry["Key"][len(self.prefix) :]
                record, etag = self._read_record(key)
                if record is None and etag is not None:
                    self._call("delete_object", key=key, IfMatch=etag)
        for entry in self._list(ANALYSES):
            image_id = entry["Key"][len(self.prefix + ANALYSES) :].removesuffix(".json")
            if (
                storage.is_image_id(image_id)
                and entry["LastModified"].timestamp() < time.time() - storage.LEFTOVER_AGE
                and not self._has_image(image_id)
            ):
                self._call("delete_object", key=entry["Key"][len(self.prefix) :])

    def _list(self, folder):
        """Every object under a folder of the prefix, page by page."""
        token = {}
        while True:
            page = self._call("list_objects_v2", Prefix=self.prefix + folder, **token) or {}
            yield from page.get("Contents", [])
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}


_LOCK = threading.Lock()
_SESSIONS = {}


def _session():
    """One boto3 session per process: clients made from it share its loaded service models."""
    session = _SESSIONS.get(os.getpid())
    if session is None:
        session = _SESSIONS[os.getpid()] = boto3.session.Session()
    return session
