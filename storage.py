"""The uploads folder is the registry: images, their analyses and the generated API key live there."""

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import secrets
import struct
import tempfile
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MAX_PIXELS = 100_000_000
IMAGE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
DIGEST = re.compile(r"[0-9a-f]{64}")  # how idempotency keys are named on disk
TEMP_PREFIX = ".tmp-"
KEY_FILE = ".api_key"
# An idempotency key's record, named by the key's digest; it is also the lock its uploads take.
IDEMPOTENCY_PREFIX = ".idem-"
# Beside an image uploaded with an idempotency key: that key's digest, so the record can go with it.
IDEMPOTENCY_SUFFIX = ".idem"
MIN_KEY_LENGTH = 32
LOCK_WAIT_SECONDS = 10  # how long a delete waits for an upload holding its idempotency key
LEFTOVER_AGE = 3600  # an analysis or key reference without its image, this old, is a crash's leftover
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png"}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
# Start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) do not.
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
JPEG_SOS, JPEG_EOI = 0xDA, b"\xff\xd9"
JPEG_MARKER = re.compile(rb"\xff+([^\xff])")
MAX_JPEG_HEADER_SEGMENTS = 1024  # real files have a few dozen; a cap stops crafted ones

# Where photos say where they were taken: Exif (its GPS IFD) and XMP in JPEG APP1 segments,
# IPTC in APP13, free text in comments, anything in vendors' APPn; Exif and text chunks in PNG.
# All are removed but what decoding needs (JFIF APP0, ICC profiles and MPF in APP2, Adobe's
# colour transform in APP14) and Exif's Orientation, kept in a minimal Exif segment of its own.
# After the image's end (EOI) anything may follow: a second image with its own Exif (MPO, gain
# maps), a motion photo's video. It is dropped, and with it the APP2 index (MPF) pointing to it.
JPEG_APP0, JPEG_APP1, JPEG_APP2 = 0xE0, 0xE1, 0xE2
JPEG_METADATA = frozenset(range(0xE0, 0xF0)) - {JPEG_APP0, JPEG_APP2, 0xEE} | {0xFE}
MPF_HEADER = b"MPF\0"
# The end of the image, or a segment between its scans: inside image data, 0xFF is only ever
# followed by 00 (a stuffed byte), a restart marker (D0-D7) or another 0xFF (fill).
JPEG_SCAN_MARKER = re.compile(rb"\xff[\xc0-\xcf\xd9-\xfe]")
PNG_METADATA = frozenset({b"eXIf", b"tEXt", b"zTXt", b"iTXt"})
EXIF_HEADER = b"Exif\0\0"
TIFF_BYTE_ORDERS = {b"II": "<", b"MM": ">"}
TIFF_SHORT = 3
ORIENTATION_TAG = 0x0112
IFD_POINTER_TAGS = frozenset({0x8769, 0x8825, 0xA005})  # Exif, GPS and Interoperability IFDs


class StorageError(Exception):
    """Base of everything storage refuses or fails at."""


class UnsupportedType(StorageError):
    """The bytes are neither a JPEG nor a PNG."""


class InvalidImage(StorageError):
    """A JPEG or PNG signature, but no readable dimensions (truncated or corrupt)."""


class ImageTooLarge(StorageError):
    """More pixels than any phone camera produces."""


class ImageNotFound(StorageError):
    """No image is stored under this id."""


class IdempotencyConflict(StorageError):
    """An upload with this idempotency key is still being processed."""


class IdempotencyKeyReused(StorageError):
    """This idempotency key was used for an upload of other bytes."""


class StorageUnavailable(StorageError):
    """The uploads folder cannot be read or written."""


class StorageFull(StorageUnavailable):
    """The disk holding the uploads folder has no room left."""


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int
    height: int


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


def inspect_image(data):
    """Identify a JPEG or PNG from its bytes and read its dimensions."""
    if data[:8] == PNG_SIGNATURE:
        width, height = _png_size(data)
        content_type = "image/png"
    elif data[:3] == JPEG_SOI:
        width, height = _jpeg_size(data)
        content_type = "image/jpeg"
    else:
        raise UnsupportedType("Only JPEG and PNG images are accepted; this file is neither.")
    if width * height > MAX_PIXELS:
        megapixels = MAX_PIXELS // 1_000_000
        raise ImageTooLarge(
            f"The image is {width}x{height} pixels; at most {megapixels} megapixels are accepted."
        )
    return ImageInfo(content_type, width, height)


def _png_size(data):
    """Check the chunk structure through IEND; return IHDR's width and height."""
    if len(data) < 33 or data[8:16] != b"\x00\x00\x00\x0dIHDR":
        raise InvalidImage("The PNG file has no valid IHDR header.")
    (crc,) = struct.unpack_from(">I", data, 29)
    if zlib.crc32(data[12:29]) != crc:
        raise InvalidImage("The PNG header is corrupt (bad IHDR checksum).")
    width, height = struct.unpack_from(">II", data, 16)
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise InvalidImage("The PNG header declares an impossible size.")
    for _ in _png_chunks(data):
        pass
    return width, height


def _png_chunks(data):
    """Yield ``(kind, start, end)`` of each chunk through IEND; raise InvalidImage if IEND is missing."""
    offset = len(PNG_SIGNATURE)
    while offset + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        end = offset + 12 + length
        if end > len(data):
            break
        yield kind, offset, end
        if kind == b"IEND":
            return
        offset = end
    raise InvalidImage("The PNG file is truncated (no IEND chunk).")


def _jpeg_size(data):
    """Walk the JPEG header segments to the start of scan; return the frame's width and height."""
    size = None
    for marker, _, body, end in _jpeg_segments(data):
        if marker in JPEG_SOF:
            if end - body < 8:
                raise InvalidImage("The JPEG frame header is too short.")
            height, width = struct.unpack_from(">HH", data, body + 3)
            if not width or not height:
                raise InvalidImage("The JPEG frame header declares no size.")
            size = width, height
    if size is None:
        raise InvalidImage("The JPEG file has no frame header before its image data.")
    if data.rfind(JPEG_EOI, end) == -1:
        raise InvalidImage("The JPEG file is truncated or corrupt.")
    return size


def _jpeg_segments(data):
    """Yield ``(marker, start, body, end)`` of each header segment, the start of scan last.

    ``start`` is where its marker (with any fill bytes) begins, ``body`` where its length field
    does. Raise InvalidImage when the segments do not lead to a start of scan.
    """
    offset = 2
    for _ in range(MAX_JPEG_HEADER_SEGMENTS):
        match = JPEG_MARKER.match(data, offset)
        if match is None:
            raise InvalidImage("The JPEG file is corrupt (expected a marker).")
        marker = data[match.start(1)]
        start, offset = match.start(), match.end()
        if marker in JPEG_STANDALONE:
            yield marker, start, offset, offset
            continue
        if offset + 2 > len(data):
            break
        (length,) = struct.unpack_from(">H", data, offset)
        if length < 2 or offset + length > len(data):
            break
        yield marker, start, offset, offset + length
        if marker == JPEG_SOS:
            return
        offset += length
    raise InvalidImage("The JPEG file is truncated or corrupt.")


def strip_location(data, content_type):
    """Remove the metadata that can locate a photo but keep its orientation; never re-encode.

    Takes an image inspect_image() accepted; returns ``data`` itself when there is nothing to remove.
    """
    if content_type == "image/jpeg":
        return _strip_jpeg(data)
    return _strip_png(data)


def _is_metadata(data, marker, body):
    return marker in JPEG_METADATA or (marker == JPEG_APP2 and data[body + 2 : body + 6] == MPF_HEADER)


def _strip_jpeg(data):
    view = memoryview(data)
    kept, removed, exif_seen, orientation, jfif_first = [], False, False, None, False
    for marker, start, body, end in _jpeg_segments(data):
        if marker == JPEG_SOS:
            scans, cut = _scans(data, start, end)
            kept.extend(scans)
            removed = removed or cut
        elif not _is_metadata(data, marker, body):
            jfif_first = jfif_first or (not kept and marker == JPEG_APP0)
            kept.append(view[start:end])
        else:
            removed = True
            if marker == JPEG_APP1 and not exif_seen and data[body + 2 : body + 8] == EXIF_HEADER:
                exif_seen = True
                orientation = _orientation_only(data[body + 8 : end])
    if not removed:
        return data
    if orientation:
        exif = EXIF_HEADER + orientation
        kept.insert(
            1 if jfif_first else 0, bytes([0xFF, JPEG_APP1]) + struct.pack(">H", len(exif) + 2) + exif
        )
    return b"".join([view[:2], *kept])


def _scans(data, start, header_end):
    """Return the image data from its first scan to its EOI, in pieces without metadata, and if any was cut.

    A progressive JPEG has several scans, with tables (and, in edited files, metadata segments)
    between them; the scans and tables are copied as they are.
    """
    view = memoryview(data)
    pieces, kept_from, offset = [], start, header_end
    while match := JPEG_SCAN_MARKER.search(data, offset):
        if data[match.start() + 1] == JPEG_EOI[1]:
            pieces.append(view[kept_from : match.end()])
            return pieces, kept_from != start or match.end() < len(data)
        segment_end = match.end() + int.from_bytes(data[match.end() : match.end() + 2], "big")
        if segment_end > len(data):
            break
        if _is_metadata(data, data[match.start() + 1], match.end()):
            pieces.append(view[kept_from : match.start()])
            kept_from = segment_end
        offset = max(segment_end, match.end())  # its contents are no markers
    pieces.append(view[kept_from:])  # no end where one was expected: keep the rest as it is
    return pieces, kept_from != start


def _strip_png(data):
    view = memoryview(data)
    kept, removed, exif_seen = [view[: len(PNG_SIGNATURE)]], False, False
    for kind, start, end in _png_chunks(data):
        if kind not in PNG_METADATA:
            kept.append(view[start:end])
            continue
        removed = True
        if kind == b"eXIf" and not exif_seen:
            exif_seen = True
            orientation = _orientation_only(data[start + 8 : end - 4])
            if orientation:
                checked = b"eXIf" + orientation
                kept.append(
                    struct.pack(">I", len(orientation)) + checked + struct.pack(">I", zlib.crc32(checked))
                )
    if not removed and end == len(data):
        return data
    return b"".join(kept)  # and nothing of what followed IEND


def _orientation_only(tiff):
    """A minimal Exif TIFF block with just the Orientation of ``tiff``; None if it has none or is malformed.

    Only the first IFD is read. Pointers to further IFDs are checked but never followed, so no
    crafted chain can loop; one that points back or out of bounds marks the whole block as
    malformed, and then no metadata at all is kept.
    """
    order = TIFF_BYTE_ORDERS.get(bytes(tiff[:2]))
    if order is None or len(tiff) < 8:
        return None
    magic, ifd = struct.unpack_from(order + "HI", tiff, 2)
    if magic != 42 or not 8 <= ifd <= len(tiff) - 2:
        return None
    (entries,) = struct.unpack_from(order + "H", tiff, ifd)
    entries_end = ifd + 2 + 12 * entries
    if entries_end + 4 > len(tiff):
        return None
    pointers = [struct.unpack_from(order + "I", tiff, entries_end)[0]]
    orientation = None
    for entry in range(ifd + 2, entries_end, 12):
        tag, kind, count, value = struct.unpack_from(order + "HHIH", tiff, entry)
        if tag in IFD_POINTER_TAGS:
            pointers.append(struct.unpack_from(order + "I", tiff, entry + 8)[0])
        elif tag == ORIENTATION_TAG and orientation is None:
            orientation = value if kind == TIFF_SHORT and count == 1 else 0
    if any(p and (p == ifd or not 8 <= p <= len(tiff) - 2) for p in pointers):
        return None
    if orientation not in range(2, 9):  # 1 is the default: nothing to keep
        return None
    fields = (42, 8, 1, ORIENTATION_TAG, TIFF_SHORT, 1, orientation, 0, 0)
    return tiff[:2] + struct.pack(order + "HIHHHIHHI", *fields)


class Storage:
    """Images as ``<image_id>.jpg|.png``, their analyses as ``<image_id>.json``, all in one folder.

    An image uploaded with an idempotency key also has ``<image_id>.idem``, naming the key's
    record ``.idem-<digest>``.
    """

    def __init__(self, folder, idempotency_ttl=24 * 3600):
        self.folder = Path(folder)
        self.idempotency_ttl = idempotency_ttl

    def check(self, min_free_bytes):
        """Raise StorageUnavailable unless the folder exists, is writable and has room for an upload."""
        try:
            usable = self.folder.is_dir() and os.access(self.folder, os.W_OK | os.X_OK)
            stats = os.statvfs(self.folder)  # raises too if the folder vanished meanwhile
        except OSError:
            usable = False
        if not usable:
            raise StorageUnavailable("The uploads folder is missing or not writable.")
        if stats.f_bavail * stats.f_frsize < min_free_bytes:
            raise StorageUnavailable("The disk holding the uploads folder is full.")

    def remove_temp_files(self):
        """Delete what interrupted writes left behind; return how many files that was."""
        removed = 0
        for path in self.folder.glob(TEMP_PREFIX + "*"):
            path.unlink(missing_ok=True)
            removed += 1
        return removed

    def save_image(self, data, idempotency_key=None):
        """Validate an upload and store it durably under a new id; return ``(StoredImage, replayed)``.

        With an ``idempotency_key`` (a digest naming the client and its key), the first upload is
        remembered for ``idempotency_ttl`` seconds: a retry of the same bytes gets it back
        (``replayed``) instead of storing a second copy. The key's record is written before the
        image, so a retry after a crash in between finishes the same upload.
        """
        info = inspect_image(data)
        if idempotency_key is None:
            return self._store(str(uuid.uuid4()), data, info), False
        fingerprint = hashlib.sha256(data).hexdigest()
        with self._idempotency_record(idempotency_key, wait=False) as record:
            if record.value is None:
                record.write({"image_id": str(uuid.uuid4()), "sha256": fingerprint})
            elif record.value["sha256"] != fingerprint:
                raise IdempotencyKeyReused("This Idempotency-Key was already used for a different file.")
            elif self.has_image(record.value["image_id"]):
                return self.image(record.value["image_id"]), True
            # A new key, or one whose first upload stopped before its image was stored: store it.
            image_id = record.value["image_id"]
            self.write_new(self._path(image_id, IDEMPOTENCY_SUFFIX), idempotency_key.encode(), replace=True)
            return self._store(image_id, data, info), False

    def _store(self, image_id, data, info):
        data = strip_location(data, info.content_type)
        self.write_new(self._path(image_id, EXTENSIONS[info.content_type]), data, replace=True)
        return StoredImage(image_id, info.content_type, len(data), info.width, info.height)

    def delete(self, image_id):
        """Remove an image, its analysis and its idempotency record; raise ImageNotFound if there is none."""
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

    def has_image(self, image_id):
        return any(os.path.exists(self._path(image_id, ext)) for ext in EXTENSIONS.values())

    def image(self, image_id):
        """Describe a stored image; raise ImageNotFound for an unknown id."""
        for extension in EXTENSIONS.values():
            try:
                with open(self._path(image_id, extension), "rb") as file:
                    mtime = os.fstat(file.fileno()).st_mtime
                    data = file.read()
                break
            except FileNotFoundError:
                continue
            except OSError as error:
                raise StorageUnavailable("The image could not be read.") from error
        else:
            raise ImageNotFound(f"No image with id {image_id} exists.")
        try:
            info = inspect_image(data)
        except StorageError as error:  # it was valid when stored: the disk changed under us
            raise StorageUnavailable("The stored image is damaged.") from error
        return StoredImage(
            image_id,
            info.content_type,
            len(data),
            info.width,
            info.height,
            uploaded_at=datetime.fromtimestamp(int(mtime), timezone.utc),
            analyzed=os.path.exists(self._path(image_id, ".json")),
        )

    def analysis(self, image_id, analyze):
        """Return ``(record, created)``: the stored analysis, made by ``analyze(image_id)`` on first use."""
        record = self.stored_analysis(image_id)
        if record is not None:
            return record, False
        if not self.has_image(image_id):
            raise ImageNotFound(f"No image with id {image_id} exists.")
        record = analyze(image_id)
        record_path = self._path(image_id, ".json")
        created = self.write_new(record_path, record, replace=False)
        if not self.has_image(image_id):  # deleted meanwhile: leave no analysis behind
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
        """The stored analysis of an image, or None when it has none yet."""
        return self._read(self._path(image_id, ".json"))

    def purge(self, uploaded_before, dry_run=False):
        """Delete the images uploaded before a time, expired idempotency records and leftovers of crashes.

        Yields ``(image_id, uploaded_at)`` for each image deleted (or, with ``dry_run``, due).
        """
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
            elif (
                extension in (".json", IDEMPOTENCY_SUFFIX)
                and is_image_id(image_id)
                and mtime < time.time() - LEFTOVER_AGE
                and not self.has_image(image_id)
            ):
                with contextlib.suppress(ImageNotFound):
                    self.delete(image_id)  # what a crash in a delete (or before an upload's image) left

    def api_key(self):
        """Return ``(key, path)`` of the key made on first start, shared by every worker and restart."""
        path = self.folder / KEY_FILE
        if not path.exists():
            # Workers starting together each try; link() lets exactly one file win.
            self.write_new(path, secrets.token_urlsafe(32).encode(), replace=False)
        return path.read_text().strip(), path

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

    def write_new(self, path, data, replace):
        """Write ``data`` to ``path`` in this folder atomically and durably: temp file, fsync, rename, fsync.

        With ``replace=False`` an existing file wins and False is returned, so
        concurrent writers of the same file agree on one version.
        """
        temp = self.folder / f"{TEMP_PREFIX}{uuid.uuid4().hex}"
        created = False
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, data)
                os.fsync(fd)
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
                temp.unlink()
            if created:  # not durable, and the caller will report a failure: take it back
                with contextlib.suppress(OSError):
                    os.unlink(path)
            raise _write_error(error) from error
        return created

    def spool(self):
        """Open a Spool in this folder: on its disk, not in memory, and never left behind."""
        try:
            # Unnamed (O_TMPFILE) where the system allows: a crash leaves nothing to clean up.
            return Spool(tempfile.TemporaryFile(dir=self.folder, buffering=0))
        except OSError as error:
            raise _write_error(error) from error

    def _sync_folder(self):
        # The rename is only durable once the directory entry itself is on disk.
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

    def __init__(self, storage, fd, path):
        self.storage = storage
        self.fd = fd
        self.path = path
        self.value = self._load()

    def _load(self):
        try:
            value = json.loads(os.pread(self.fd, 4096, 0))
        except (OSError, ValueError):
            return None
        if (
            not isinstance(value, dict)
            or not is_image_id(str(value.get("image_id")))
            or not isinstance(value.get("sha256"), str)
            or not isinstance(value.get("created_at"), int)
            or value["created_at"] < time.time() - self.storage.idempotency_ttl
        ):
            return None
        return value

    def write(self, value):
        value = {**value, "created_at": int(time.time())}
        try:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps(value).encode(), 0)
            os.fsync(self.fd)
            self.storage._sync_folder()  # a new record's name is on disk before its image is
        except OSError as error:
            raise _write_error(error) from error
        self.value = value

    def delete(self):
        self.storage._unlink(self.path)


class Spool:
    """A request body waiting for its turn in a temporary file, so that it holds no memory meanwhile."""

    def __init__(self, file):
        self.file = file
        self.size = 0

    def __len__(self):
        return self.size

    def write(self, chunk):
        try:
            _write_all(self.file.fileno(), chunk)
        except OSError as error:
            self.close()
            raise _write_error(error) from error
        self.size += len(chunk)

    def read(self):
        """Return the whole body, as a bytearray the caller may cut in place, and delete the file."""
        body = bytearray(self.size)
        try:
            view = memoryview(body)
            self.file.seek(0)
            while view and (count := self.file.readinto(view)):
                view = view[count:]
            return body
        except OSError as error:
            raise StorageUnavailable("The uploads folder could not be read.") from error
        finally:
            self.close()

    def close(self):
        self.file.close()


def _write_all(fd, data):
    """Write all of ``data``: one os.write may write less."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _write_error(error):
    """The StorageError for an OSError met while writing to the uploads folder."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("The disk holding the uploads folder is full.")
    return StorageUnavailable("The uploads folder could not be written.")
