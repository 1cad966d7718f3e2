"""The uploads folder is the registry: images, their analyses and the generated API key live there."""

import contextlib
import errno
import os
import re
import secrets
import struct
import tempfile
import uuid
import zlib
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

MAX_PIXELS = 100_000_000
IMAGE_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TEMP_PREFIX = ".tmp-"
KEY_FILE = ".api_key"
MIN_KEY_LENGTH = 32
EXTENSIONS = {"image/jpeg": ".jpg", "image/png": ".png"}

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
# Start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) do not.
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
JPEG_SOS, JPEG_EOI = 0xDA, b"\xff\xd9"
JPEG_MARKER = re.compile(rb"\xff+([^\xff])")
MAX_JPEG_HEADER_SEGMENTS = 1024  # real files have a few dozen; a cap stops crafted ones


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
    offset = 33
    while offset + 12 <= len(data):
        length, kind = struct.unpack_from(">I4s", data, offset)
        offset += 12 + length
        if kind == b"IEND":
            break
    else:
        offset = len(data) + 1
    if offset > len(data):
        raise InvalidImage("The PNG file is truncated (no IEND chunk).")
    return width, height


def _jpeg_size(data):
    """Walk the JPEG header segments to the start of scan; return the frame's width and height."""
    size = None
    offset = 2
    for _ in range(MAX_JPEG_HEADER_SEGMENTS):
        match = JPEG_MARKER.match(data, offset)
        if match is None:
            raise InvalidImage("The JPEG file is corrupt (expected a marker).")
        marker = data[match.start(1)]
        offset = match.end()
        if marker in JPEG_STANDALONE:
            continue
        if offset + 2 > len(data):
            break
        (length,) = struct.unpack_from(">H", data, offset)
        if length < 2 or offset + length > len(data):
            break
        if marker in JPEG_SOF:
            if length < 8:
                raise InvalidImage("The JPEG frame header is too short.")
            height, width = struct.unpack_from(">HH", data, offset + 3)
            if not width or not height:
                raise InvalidImage("The JPEG frame header declares no size.")
            size = width, height
        offset += length
        if marker == JPEG_SOS:
            if size is None:
                raise InvalidImage("The JPEG file has no frame header before its image data.")
            if data.rfind(JPEG_EOI, offset) == -1:
                break
            return size
    raise InvalidImage("The JPEG file is truncated or corrupt.")


class Storage:
    """Images as ``<image_id>.jpg|.png``, their analyses as ``<image_id>.json``, all in one folder."""

    def __init__(self, folder):
        self.folder = Path(folder)

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

    def save_image(self, data):
        """Validate and durably store an upload under a new id."""
        info = inspect_image(data)
        image_id = str(uuid.uuid4())
        self.write_new(self._path(image_id, EXTENSIONS[info.content_type]), data, replace=True)
        return StoredImage(image_id, info.content_type, len(data), info.width, info.height)

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
        if self.write_new(record_path, record, replace=False):
            return record, True
        # Another worker stored it first: theirs is the record of this image.
        return self.stored_analysis(image_id), False

    def stored_analysis(self, image_id):
        """The stored analysis of an image, or None when it has none yet."""
        try:
            with open(self._path(image_id, ".json"), "rb") as file:
                return file.read()
        except FileNotFoundError:
            return None
        except OSError as error:
            raise StorageUnavailable("The analysis record could not be read.") from error

    def api_key(self):
        """Return ``(key, path)`` of the key made on first start, shared by every worker and restart."""
        path = self.folder / KEY_FILE
        if not path.exists():
            # Workers starting together each try; link() lets exactly one file win.
            self.write_new(path, secrets.token_urlsafe(32).encode(), replace=False)
        return path.read_text().strip(), path

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
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
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


class Spool:
    """A request body waiting for its turn in a temporary file, so that it holds no memory meanwhile."""

    def __init__(self, file):
        self.file = file
        self.size = 0

    def __len__(self):
        return self.size

    def write(self, chunk):
        try:
            view = memoryview(chunk)
            while view:
                view = view[self.file.write(view) :]
        except OSError as error:
            self.close()
            raise _write_error(error) from error
        self.size += len(chunk)

    def read(self):
        """Return the whole body and delete the file."""
        try:
            self.file.seek(0)
            return self.file.read()
        except OSError as error:
            raise StorageUnavailable("The uploads folder could not be read.") from error
        finally:
            self.close()

    def close(self):
        self.file.close()


def _write_error(error):
    """The StorageError for an OSError met while writing to the uploads folder."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageFull("The disk holding the uploads folder is full.")
    return StorageUnavailable("The uploads folder could not be written.")
