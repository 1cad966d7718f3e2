"""The registry of images, their analyses, idempotency records and the generated API key.

``Registry`` is the interface app.py uses and the errors it raises; ``Folder`` keeps everything in
the uploads folder, the default. bucket.py keeps it in an S3-compatible bucket instead.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import mmap
import os
import re
import secrets
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import images

IMAGE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DIGEST = re.compile(r"[0-9a-f]{64}")  # how idempotency keys are named
MIN_KEY_LENGTH = 32
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png"}
# An upload's file part waits in memory up to this size, then in a file on disk.
SPOOL_BYTES = 256 * 1024
TEMP_PREFIX = ".tmp-"
KEY_FILE = ".api_key"
# An idempotency key's record, named by the key's digest; it is also the lock its uploads take.
IDEMPOTENCY_PREFIX = ".idem-"
# Beside an image uploaded with an idempotency key: that key's digest, so the record can go with it.
IDEMPOTENCY_SUFFIX = ".idem"
LOCK_WAIT_SECONDS = 10  # how long a delete waits for an upload holding its idempotency key
LEFTOVER_AGE = 3600  # an analysis or key reference without its image, this old, is a crash's leftover


class StorageError(Exception):
    """Base of everything the registry refuses or fails at."""


class ImageNotFound(StorageError):
    """No image is stored under this id."""


class IdempotencyConflict(StorageError):
    """An upload with this idempotency key is still being processed."""


class IdempotencyKeyReused(StorageError):
    """This idempotency key was used for an upload of other bytes."""


class StorageUnavailable(StorageError):
    """The registry cannot be read or written."""


class StorageFull(StorageUnavailable):
    """The disk holding the uploads folder has no room left."""


@dataclass(frozen=True)
class StoredImage:
    image_id: str
    content_type: str
    size_bytes: int
    width: int
    height: int
    uploaded_at: datetime | None = None
    analyzed: bool = False


def is_image_id(value):
    """True for a lowercase canonical UUID, the only shape of a stored image's id."""
    return IMAGE_ID.fullmatch(value) is not None


def stored_size(upload, pieces):
    """The size of what a spooled upload becomes with ``pieces`` (None: all of it) written out."""
    if pieces is None:
        return upload.size
    return sum(len(range(upload.size)[piece]) if isinstance(piece, slice) else len(piece) for piece in pieces)


def live_idempotency_record(value, ttl):
    """``value`` read from an idempotency record if it is one and younger than ``ttl`` seconds, else None."""
    if (
        not isinstance(value, dict)
        or not is_image_id(str(value.get("image_id")))
        or not isinstance(value.get("sha256"), str)
        or not isinstance(value.get("created_at"), int)
        or value["created_at"] < time.time() - ttl
    ):
        return None
    return value


class Registry:
    """What app.py needs of a registry. Every method may raise StorageUnavailable (or StorageFull).

    Ids reaching a registry have passed is_image_id(). Nothing is ever half-stored: an image is
    whole or absent, and an analysis or idempotency record never outlives its image.
    """

    def open(self, clean):
        """Get ready to serve; with ``clean`` (a starting server), remove crash leftovers. Return how many."""
        raise NotImplementedError

    def describe(self):
        """Where everything is kept, for the start-up log line."""
        raise NotImplementedError

    def check(self):
        """Raise StorageUnavailable unless uploads can be stored now (the health check)."""
        raise NotImplementedError

    def api_key(self):
        """Return ``(key, where)`` of the key made on first start, shared by every worker, instance and restart."""
        raise NotImplementedError

    def spool(self, size, fingerprinted):
        """A new Spool for an upload's file part, on local storage (see Spool for the arguments)."""
        raise NotImplementedError

    def save_image(self, upload, idempotency_key=None):
        """Validate a spooled upload, remove its location and store it; return ``(StoredImage, replayed)``.

        Raises images.ImageError for bytes that are no acceptable photo. With an
        ``idempotency_key`` (a digest naming the client and its key), a retry of the same bytes
        gets the first upload back (``replayed``); other bytes raise IdempotencyKeyReused, and a
        retry while the first is in progress IdempotencyConflict.
        """
        raise NotImplementedError

    def image(self, image_id):
        """Describe a stored image (with ``uploaded_at`` and ``analyzed``); raise ImageNotFound."""
        raise NotImplementedError

    def delete(self, image_id):
        """Remove an image, its analysis and its idempotency record; raise ImageNotFound if there is none."""
        raise NotImplementedError

    def analysis(self, image_id, analyze):
        """Return ``(record, created)``: the stored analysis, made by ``analyze(image_id)`` on first use.

        Concurrent first calls agree on one record. Raises ImageNotFound for an unknown image.
        """
        raise NotImplementedError

    def stored_analysis(self, image_id):
        """The stored analysis record of an image, or None when it has none yet."""
        raise NotImplementedError

    def purge(self, uploaded_before, dry_run=False):
        """Delete images uploaded before a time (as delete() does), expired idempotency records and leftovers.

        Yields ``(image_id, uploaded_at)`` for each image deleted (or, with ``dry_run``, due).
        """
        raise NotImplementedError


class Spool:
    """An upload's file part as it arrives: in memory up to SPOOL_BYTES, then in a file in ``folder``.

    So a body waiting for its turn holds little memory. One announced (``size``) as larger goes
    to the file as soon as its JPEG header is all there, and without its location metadata
    (images.strip_header): a large photo is then written out once, not once as sent and again
    without its metadata, which costs about 2 ms of kernel time per MiB on this disk. A ``named``
    spool lives in the uploads folder under a temporary name, so that what is stored as it is
    becomes its file by a rename, with no copy; a crash leaves that name behind for the next start
    to remove. With ``fingerprinted``, the SHA-256 of the bytes as sent is kept as they arrive.
    """

    def __init__(self, folder, named, size=None, fingerprinted=False):
        self.folder = folder
        self.named = named
        self.size = 0  # of the content, once its header has lost its metadata
        self._memory = bytearray()
        self._file = None
        self._path = None
        self._large = size is not None and size > SPOOL_BYTES
        self._header_retry_at = 0  # bytes to hold before the header is looked at (again)
        self._mapped = None
        self._digest = hashlib.sha256() if fingerprinted else None

    @property
    def in_file(self):
        return self._file is not None

    def write(self, data):
        """Append ``data``; raise StorageUnavailable or StorageFull (and discard the spool) on failure."""
        if self._digest is not None:
            self._digest.update(data)
        try:
            if self._file is not None:
                _write_all(self._file.fileno(), data)
                self.size += len(data)
                return
            self._memory += data
            self.size += len(data)
            full, header = self.size > SPOOL_BYTES, None
            if full or self._large and self.size >= self._header_retry_at:
                header = images.strip_header(self._memory)
                # Looked at again only once twice as much is held: a header that arrives a byte
                # at a time is parsed a few times, not once a byte (0.8 ms each, crafted).
                self._header_retry_at = 2 * self.size
            if header is not None or full:
                self._roll_over(header or (None, 0))
        except OSError as error:
            self.close()
            raise _write_error(error) from error

    def _roll_over(self, header):
        """Go on in a file, with what is held so far: its header's pieces (as strip_header gives them), then the rest."""
        if self.named:
            self._path = f"{self.folder}/{TEMP_PREFIX}{uuid.uuid4().hex}"
            self._file = os.fdopen(os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600), "rb+", 0)
        else:  # unnamed (O_TMPFILE) where the system allows: nothing to clean up after a crash
            self._file = tempfile.TemporaryFile(dir=self.folder, buffering=0)
        pieces, end = header
        self.size = 0
        for piece in [*(pieces or [slice(0, end)]), slice(end, len(self._memory))]:
            chunk = memoryview(self._memory)[piece] if isinstance(piece, slice) else piece
            _write_all(self._file.fileno(), chunk)
            self.size += len(chunk)
        self._memory = bytearray()

    @contextlib.contextmanager
    def view(self):
        """Yield the whole content as one bytes-like object (a bytearray or a read-only mmap)."""
        if self._file is None:
            yield self._memory
            return
        try:
            self._mapped = mmap.mmap(self._file.fileno(), self.size, access=mmap.ACCESS_READ)
        except (OSError, ValueError) as error:
            raise StorageUnavailable("The uploaded file could not be read back.") from error
        try:
            yield self._mapped
        finally:
            with contextlib.suppress(BufferError):  # views still held by a traceback: the GC closes it
                self._mapped.close()
            self._mapped = None

    def release(self, offset):
        """Let go of the mapped pages before ``offset``: read once, they need not stay in this process."""
        if self._mapped is not None:
            self._mapped.madvise(mmap.MADV_DONTNEED, 0, offset - offset % mmap.PAGESIZE)

    def fingerprint(self):
        """The SHA-256 of the bytes as sent: what tells a retry from another upload under one idempotency key."""
        return self._digest.hexdigest()

    def write_to(self, fd, pieces=None):
        """Write the content to ``fd``: all of it, or ``pieces`` (slices of it, and new bytes) in order.

        From a file, slices are copied by the kernel (copy_file_range), never through this process.
        """
        for piece in [slice(0, self.size)] if pieces is None else pieces:
            if not isinstance(piece, slice):
                _write_all(fd, piece)
            elif self._file is None:
                _write_all(fd, memoryview(self._memory)[piece])
            else:
                _copy_range(self._file.fileno(), fd, piece.start, piece.stop)

    def commit(self, path, size):
        """Make the spooled file, cut to ``size``, durable under ``path`` in its folder; the caller syncs the folder."""
        if size < self.size:
            os.ftruncate(self._file.fileno(), size)
        _make_durable(self._file.fileno(), evict=True)
        os.rename(self._path, path)
        self._path = None

    def close(self):
        """Discard whatever was not committed."""
        self._memory = bytearray()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                os.unlink(self._path)
            self._path = None


class Folder(Registry):
    """Images as ``<image_id>.jpg|.png``, their analyses as ``<image_id>.json``, all in one folder.

    An image uploaded with an idempotency key also has ``<image_id>.idem``, naming the key's
    record ``.idem-<digest>``.
    """

    def __init__(self, folder, idempotency_ttl=24 * 3600, min_free_bytes=0):
        self.folder = Path(folder)
        self.idempotency_ttl = idempotency_ttl
        self.min_free_bytes = min_free_bytes
        self._folder_sync = GroupSync(self.folder)

    def open(self, clean):
        """Delete what interrupted writes left behind when ``clean``; return how many files that was."""
        removed = 0
        if clean:
            for path in self.folder.glob(TEMP_PREFIX + "*"):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def describe(self):
        return f"folder {self.folder}"

    def check(self):
        """Raise StorageUnavailable unless the folder exists, is writable and has room for an upload."""
        try:
            usable = self.folder.is_dir() and os.access(self.folder, os.W_OK | os.X_OK)
            stats = os.statvfs(self.folder)  # raises too if the folder vanished meanwhile
        except OSError:
            usable = False
        if not usable:
            raise StorageUnavailable("The uploads folder is missing or not writable.")
        if stats.f_bavail * stats.f_frsize < self.min_free_bytes:
            raise StorageUnavailable("The disk holding the uploads folder is full.")

    def spool(self, size, fingerprinted):
        return Spool(self.folder, named=True, size=size, fingerprinted=fingerprinted)

    def save_image(self, upload, idempotency_key=None):
        """Store an upload durably under a new id (see Registry.save_image).

        The key's record is written before the image, under a lock on itself, so a retry after
        a crash in between finishes the same upload.
        """
        with upload.view() as data:
            info = images.inspect(data)
            if idempotency_key is None:
                return self._store(str(uuid.uuid4()), upload, data, info), False
            sent = upload.fingerprint()
            with self._idempotency_record(idempotency_key, wait=False) as record:
                if record.value is None:
                    record.write({"image_id": str(uuid.uuid4()), "sha256": sent})
                elif record.value["sha256"] != sent:
                    raise IdempotencyKeyReused("This Idempotency-Key was already used for a different file.")
                elif self._has_image(record.value["image_id"]):
                    return self.image(record.value["image_id"]), True
                # A new key, or one whose first upload stopped before its image was stored: store it.
                image_id = record.value["image_id"]
                path = self._path(image_id, IDEMPOTENCY_SUFFIX)
                self.write_new(path, idempotency_key.encode(), replace=True)
                return self._store(image_id, upload, data, info), False

    def _store(self, image_id, upload, data, info):
        pieces = images.strip_location(data, info.content_type, release=upload.release)
        path = self._path(image_id, EXTENSIONS[info.content_type])
        # What only loses an end (a motion photo's video, a second image) is cut off in place.
        kept = (pieces or [slice(0, upload.size)])[0]
        if upload.in_file and upload.named and (pieces is None or len(pieces) == 1 and kept.start == 0):
            self._commit(upload, path, kept.stop)
        else:
            self._write_file(path, lambda fd: upload.write_to(fd, pieces), replace=True, evict=True)
        return StoredImage(image_id, info.content_type, stored_size(upload, pieces), info.width, info.height)

    def _commit(self, upload, path, size):
        """Rename a spooled upload, cut to ``size``, into place, as durably as write_new() writes."""
        committed = False
        try:
            upload.commit(path, size)
            committed = True
            self._sync_folder()
        except OSError as error:
            upload.close()
            if committed:  # not durable, and the caller will report a failure: take it back
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise _write_error(error) from error

    def delete(self, image_id):
        key = (self._read(self._path(image_id, IDEMPOTENCY_SUFFIX)) or b"").decode("ascii", "replace")
        # Holding the key's lock: a retry of the upload cannot see the record and then store the
        # image again after it was deleted.
        locked = (
            self._idempotency_record(key, wait=True, create=False)
            if DIGEST.fullmatch(key)
            else contextlib.nullcontext()
        )
        with locked as record:
            # The record first: a retry of the upload must never find it without its image, and
            # store the image again.
            if record is not None and record.value and record.value["image_id"] == image_id:
                record.delete()
            removed = [self._unlink(self._path(image_id, ext)) for ext in EXTENSIONS.values()]
            # After the image: an analysis written meanwhile sees it gone and removes itself. Also
            # when there was no image: what a crash in an earlier delete left goes now.
            leftovers = [self._unlink(self._path(image_id, ext)) for ext in (".json", IDEMPOTENCY_SUFFIX)]
            if any(removed + leftovers):
                self._sync_folder()
        if not any(removed):
            raise ImageNotFound(f"No image with id {image_id} exists.")

    def _has_image(self, image_id):
        return any(os.path.exists(self._path(image_id, ext)) for ext in EXTENSIONS.values())

    def image(self, image_id):
        for extension in EXTENSIONS.values():
            try:
                with open(self._path(image_id, extension), "rb") as file:
                    stats = os.fstat(file.fileno())
                    with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as data:
                        info = images.inspect(data)
                break
            except FileNotFoundError:
                continue
            except (OSError, ValueError, images.ImageError) as error:  # it was valid when stored
                raise StorageUnavailable("The stored image could not be read or is damaged.") from error
        else:
            raise ImageNotFound(f"No image with id {image_id} exists.")
        return StoredImage(
            image_id,
            info.content_type,
            stats.st_size,
            info.width,
            info.height,
            uploaded_at=datetime.fromtimestamp(int(stats.st_mtime), timezone.utc),
            analyzed=os.path.exists(self._path(image_id, ".json")),
        )

    def analysis(self, image_id, analyze):
        record = self.stored_analysis(image_id)
        if record is not None:
            return record, False
        if not self._has_image(image_id):
            raise ImageNotFound(f"No image with id {image_id} exists.")
        record = analyze(image_id)
        record_path = self._path(image_id, ".json")
        created = self.write_new(record_path, record, replace=False)
        if not self._has_image(image_id):  # deleted meanwhile: leave no analysis behind
            self._unlink(record_path)
            raise ImageNotFound(f"No image with id {image_id} exists.")
        if created:
            return record, True
        # Another worker stored it first: theirs is the record of this image.
        stored = self.stored_analysis(image_id)
        if stored is None:
            raise ImageNotFound(f"No image with id {image_id} exists.")
        return stored, False

    def stored_analysis(self, image_id):
        return self._read(self._path(image_id, ".json"))

    def purge(self, uploaded_before, dry_run=False):
        with os.scandir(self.folder) as entries:
            names = [entry.name for entry in entries]
        for name in names:
            try:
                mtime = os.stat(f"{self.folder}/{name}").st_mtime
            except FileNotFoundError:  # deleted meanwhile
                continue
            image_id, extension = os.path.splitext(name)
            if extension in EXTENSIONS.values() and is_image_id(image_id) and mtime < uploaded_before:
                uploaded_at = datetime.fromtimestamp(int(mtime), timezone.utc)
                if dry_run:
                    yield image_id, uploaded_at
                    continue
                with contextlib.suppress(ImageNotFound):  # deleted meanwhile
                    self.delete(image_id)
                    yield image_id, uploaded_at
            elif dry_run:
                continue
            elif name.startswith(IDEMPOTENCY_PREFIX) and mtime < time.time() - self.idempotency_ttl:
                key = name[len(IDEMPOTENCY_PREFIX) :]
                with (
                    contextlib.suppress(IdempotencyConflict),
                    self._idempotency_record(key, wait=False, create=False) as record,
                ):
                    if record is not None and record.value is None:
                        record.delete()
            elif name.startswith(TEMP_PREFIX) and mtime < time.time() - LEFTOVER_AGE:
                # A live upload's file changes at least every CLIENT_TIMEOUT seconds: this one is a
                # crash's leftover.
                self._unlink(f"{self.folder}/{name}")
            elif (
                extension in (".json", IDEMPOTENCY_SUFFIX)
                and is_image_id(image_id)
                and mtime < time.time() - LEFTOVER_AGE
                and not self._has_image(image_id)
            ):
                with contextlib.suppress(ImageNotFound):
                    self.delete(image_id)  # what a crash in a delete (or before an upload's image) left

    def api_key(self):
        path = self.folder / KEY_FILE
        if not path.exists():
            # Workers starting together each try; link() lets exactly one file win.
            self.write_new(path, secrets.token_urlsafe(32).encode(), replace=False)
        return path.read_text().strip(), str(path)

    @contextlib.contextmanager
    def _idempotency_record(self, key, wait, create=True):
        """Lock the record of an idempotency key and yield it.

        If another request holds it, raise IdempotencyConflict, or with ``wait`` wait for it up
        to LOCK_WAIT_SECONDS. With ``create=False``, yield None when the key has no record.
        """
        path = f"{self.folder}/{IDEMPOTENCY_PREFIX}{key}"
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        while True:
            try:
                fd = os.open(path, os.O_RDWR | (os.O_CREAT if create else 0), 0o600)
            except FileNotFoundError as error:
                if create:  # the folder is gone
                    raise _write_error(error) from error
                yield None
                return
            except OSError as error:
                raise _write_error(error) from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                # A delete may have removed the file meanwhile: only the one at path counts.
                if os.path.samestat(os.fstat(fd), os.stat(path)):
                    break
            except BlockingIOError:
                if not wait:
                    os.close(fd)
                    raise IdempotencyConflict(
                        "An upload with this Idempotency-Key is still in progress; retry it later."
                    ) from None
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise StorageUnavailable("The image is busy with another request; retry later.") from None
                time.sleep(0.01)
            except FileNotFoundError:
                pass
            except OSError as error:
                os.close(fd)
                raise _write_error(error) from error
            os.close(fd)
        try:
            yield IdempotencyRecord(self, fd, path)
        finally:
            os.close(fd)  # releases the lock; so does the death of the process

    def _read(self, path):
        try:
            with open(path, "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StorageUnavailable("The uploads folder could not be read.") from error

    def _unlink(self, path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        except OSError as error:
            raise _write_error(error) from error
        return True

    def _path(self, image_id, extension):
        # Only ids that passed is_image_id() reach here: they cannot name another folder.
        # A plain string: pathlib's parsing is a visible share of a repeat analysis.
        return f"{self.folder}/{image_id}{extension}"

    def write_new(self, path, data, replace, evict=False):
        """Write ``data`` to ``path`` in this folder atomically and durably (see _write_file)."""
        return self._write_file(path, lambda fd: _write_all(fd, data), replace, evict)

    def _write_file(self, path, write, replace, evict=False):
        """Make ``path`` in this folder what ``write(fd)`` writes, atomically and durably.

        A temporary file, fsync, rename, fsync of the folder. With ``replace=False`` an existing
        file wins and False is returned, so concurrent writers of the same file agree on one version.
        With ``evict``, its pages leave the page cache once on disk (see _make_durable).
        """
        temp = f"{self.folder}/{TEMP_PREFIX}{uuid.uuid4().hex}"
        created = False
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                write(fd)
                _make_durable(fd, evict)
            finally:
                os.close(fd)
            if replace:
                os.rename(temp, path)
                created = True
            else:
                with contextlib.suppress(FileExistsError):
                    os.link(temp, path)
                    created = True
                os.unlink(temp)
            self._sync_folder()
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temp)
            if created:  # not durable, and the caller will report a failure: take it back
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise _write_error(error) from error
        return created

    def _sync_folder(self):
        # A rename is only durable once the directory entry itself is on disk.
        self._folder_sync.sync()


class GroupSync:
    """fsync() of a folder, one for all the threads that need one at the same moment (group commit).

    A caller's changes to the folder are durable once an fsync that started after them is done,
    so a caller that finds one running waits for the next, which it or another waiter starts:
    uploads landing together share one fsync instead of queueing for one each. Each fsync costs
    about 0.14 ms of CPU and a wait for the disk on this machine.
    """

    def __init__(self, folder):
        self.folder = folder
        self._changed = threading.Condition()
        self._started = 0  # fsyncs begun so far
        self._done = 0  # fsyncs finished so far
        self._running = False
        self._failures = {}  # the number of an fsync that failed, and its error

    def sync(self):
        """Return once every change this thread made to the folder is on disk; raise OSError if not."""
        with self._changed:
            needed = self._started + 1  # one begun before now may have missed this thread's changes
            while self._done < needed:
                if self._running:
                    self._changed.wait()
                    continue
                self._running, self._started = True, self._started + 1
                number = self._started
                self._changed.release()
                try:
                    error = None
                    self._fsync()
                except OSError as failure:
                    error = failure
                finally:
                    self._changed.acquire()
                    self._running, self._done = False, number
                    if error is not None:
                        self._failures[number] = error
                    self._failures = {n: e for n, e in self._failures.items() if n > number - 1000}
                    self._changed.notify_all()
            error = self._failures.get(needed)
        if error is not None:
            raise error

    def _fsync(self):
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class IdempotencyRecord:
    """The record of an idempotency key, read and written in place while its lock is held.

    ``value`` is ``{"image_id", "sha256", "created_at"}``, or None when the key is new, expired,
    or its record was cut short by a crash (which happens before its image is stored).
    """

    def __init__(self, folder, fd, path):
        self.folder = folder
        self.fd = fd
        self.path = path
        self.value = self._load()

    def _load(self):
        try:
            value = json.loads(os.pread(self.fd, 4096, 0))
        except (OSError, ValueError):
            return None
        return live_idempotency_record(value, self.folder.idempotency_ttl)

    def write(self, value):
        value = {**value, "created_at": int(time.time())}
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(value).encode(), 0)
            os.fsync(self.fd)
            self.folder._sync_folder()  # a new record's name is on disk before its image is
        except OSError as error:
            raise _write_error(error) from error
        self.value = value

    def delete(self):
        self.folder._unlink(self.path)


def _make_durable(fd, evict):
    """fsync ``fd``; with ``evict``, then drop its pages, clean now, from the page cache.

    A stored photo is written once and rarely read back: given back at once, its pages are what
    the next upload writes into, and the cache keeps what is read (analyses) instead of photos.
    On this machine (a Firecracker VM) writing and syncing 1,000 files of 1 MB cost 0.4 ms of
    CPU per file that way and 1.4-1.9 ms when they all stayed cached, while the VM's memory was
    new to it; on a VM whose memory the kernel had already cycled through, both cost 0.4-0.7 ms.
    """
    os.fsync(fd)
    if evict:
        with contextlib.suppress(OSError):  # advice: a file system may not take it
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def _copy_range(source, fd, start, end):
    """Copy ``source``'s bytes from ``start`` to ``end`` to ``fd``, in the kernel where it can."""
    while start < end:
        try:
            copied = os.copy_file_range(source, fd, end - start, start)
        except OSError as error:  # a kernel or filesystem without it: through a small buffer
            if error.errno not in (errno.ENOSYS, errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            copied = os.write(fd, os.pread(source, min(end - start, 1024 * 1024), start))
        if not copied:
            raise OSError(errno.EIO, "the spool ended early")
        start += copied


def _write_all(fd, data):
    """Write all of ``data``: one os.write may write less."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_error(error):
    """The StorageError for an OSError met while writing."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("The disk holding the uploads folder is full.")
    return StorageUnavailable("The uploads folder could not be written.")
