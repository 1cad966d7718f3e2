"""Pure byte work on photos: what a JPEG or PNG is, its dimensions, and the same photo without location."""

import re
import struct
import zlib
from dataclasses import dataclass

MAX_PIXELS = 100_000_000
CONTENT_TYPES = ("image/jpeg", "image/png")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SOI = b"\xff\xd8\xff"
# Start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) do not.
JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
JPEG_STANDALONE = frozenset(range(0xD0, 0xD8)) | {0x01}
JPEG_SOS, JPEG_EOI = 0xDA, b"\xff\xd9"
# A marker: 0xFF, any fill bytes (more 0xFF), then its code. FF 00 is a stuffed byte, never a marker.
JPEG_MARKER = re.compile(rb"\xff+([^\x00\xff])")
MAX_JPEG_HEADER_SEGMENTS = 1024  # real files have a few dozen; a cap stops crafted ones
# libjpeg skips stray bytes before a header marker ("extraneous bytes before marker"), and real
# files need it: a Photoshop APP13 declaring 16 bytes too few, an Adobe APP14 one byte too few,
# junk after a comment (1 to 16 bytes in the files seen). The skip is bounded: a file with more
# junk than this between its segments is taken for what it is, corrupt.
MAX_JPEG_JUNK_BYTES = 1024
# The image data is searched for markers this much at a time (see strip_location's release).
SCAN_WINDOW = 1024 * 1024

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


class ImageError(Exception):
    """Base of what makes bytes unacceptable as a photo."""


class UnsupportedType(ImageError):
    """The bytes are neither a JPEG nor a PNG."""


class InvalidImage(ImageError):
    """A JPEG or PNG signature, but no readable dimensions (truncated or corrupt)."""


class ImageTooLarge(ImageError):
    """More pixels than any phone camera produces."""


@dataclass(frozen=True)
class ImageInfo:
    content_type: str
    width: int
    height: int


def inspect(data):
    """Identify a JPEG or PNG from its bytes and read its dimensions.

    ``data`` is any bytes-like object with ``find`` (bytes, bytearray, mmap).
    """
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


def strip_location(data, content_type, release=None):
    """Return the pieces that make the same photo as ``data`` without location metadata, or None.

    None means there is nothing to remove. Orientation is kept and nothing is re-encoded: each
    piece is a ``slice`` of ``data`` to copy, or new ``bytes``, to be written out in order.
    ``release(offset)``, when given, is called as the scan of the image data moves on: nothing
    before ``offset`` is read again, so a caller holding a mapping can let go of it. Takes an
    image inspect() accepted.
    """
    pieces = _strip_jpeg(data, release) if content_type == "image/jpeg" else _strip_png(data)
    return None if pieces is None else _joined(pieces)


def _joined(pieces):
    """The same pieces, with slices that follow on from each other made one."""
    joined = []
    for piece in pieces:
        if (
            joined
            and isinstance(piece, slice)
            and isinstance(joined[-1], slice)
            and joined[-1].stop == piece.start
        ):
            joined[-1] = slice(joined[-1].start, piece.stop)
        else:
            joined.append(piece)
    return joined


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
    does. Stray bytes before a marker are skipped as libjpeg skips them; a segment whose
    ``start`` is not the previous one's ``end`` follows such bytes. Raise InvalidImage when the
    segments do not lead to a start of scan.
    """
    offset = 2
    for _ in range(MAX_JPEG_HEADER_SEGMENTS):
        match = JPEG_MARKER.match(data, offset)
        if match is None:
            match = JPEG_MARKER.search(data, offset, offset + MAX_JPEG_JUNK_BYTES + 2)
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


def _is_metadata(data, marker, body):
    return marker in JPEG_METADATA or (marker == JPEG_APP2 and data[body + 2 : body + 6] == MPF_HEADER)


def strip_header(head):
    """The start of a JPEG without location, once ``head`` holds its whole header.

    Returns ``(pieces, end)``: what replaces ``head[:end]``, the header up to its first start of
    scan (pieces as strip_location() gives them, or None when nothing in it needs removing), so
    that a large upload can be written out without its metadata from the start. Returns None
    while ``head`` may still be too short to tell, and ``(None, 0)`` for what is no JPEG.
    """
    if len(head) < len(JPEG_SOI):
        return None
    if head[:3] != JPEG_SOI:
        return None, 0
    try:
        pieces, removed, end, _ = _strip_header(head)
    except InvalidImage:  # cut short here, or corrupt: what follows tells, inspect() decides
        return None
    return (_joined(pieces) if removed else None), end


def _strip_jpeg(data, release):
    header, removed, scan_start, scan_end = _strip_header(data)
    scans, cut = _scans(data, scan_start, scan_end, release)
    return [*header, *scans] if removed or cut else None


def _strip_header(data):
    """Return ``(pieces, removed, start, end)``: the header before the first scan, without location.

    ``start`` and ``end`` are where the first start-of-scan segment begins and ends. An Exif
    segment that holds nothing but an orientation, as this function writes it, stays where it
    is, so that stripping what was stripped removes nothing.
    """
    kept, removed, exif_seen, orientation, jfif_first, expected = [], False, False, None, False, 2
    for marker, start, body, end in _jpeg_segments(data):
        removed = removed or start != expected  # stray bytes before it, which decoders skip anyway
        expected = end
        if marker == JPEG_SOS:
            break
        if marker == JPEG_APP1 and not exif_seen and data[body + 2 : body + 8] == EXIF_HEADER:
            exif_seen = True
            orientation = _orientation_only(data[body + 8 : end])
            if orientation is not None and data[body + 8 : end] == orientation:
                kept.append(slice(start, end))
                orientation = None
            else:
                removed = True
        elif not _is_metadata(data, marker, body):
            jfif_first = jfif_first or (not kept and marker == JPEG_APP0)
            kept.append(slice(start, end))
        else:
            removed = True
    if orientation:
        exif = EXIF_HEADER + orientation
        kept.insert(
            1 if jfif_first else 0, bytes([0xFF, JPEG_APP1]) + struct.pack(">H", len(exif) + 2) + exif
        )
    return [slice(0, 2), *kept], removed, start, end


def _scans(data, start, header_end, release):
    """Return the image data from its first scan to its EOI, in pieces without metadata, and if any was cut.

    A progressive JPEG has several scans, with tables (and, in edited files, metadata segments)
    between them; the scans and tables are copied as they are. The data is searched a window at
    a time, so that ``release`` can be told what the search has left behind.
    """
    pieces, kept_from, offset = [], start, header_end
    while offset < len(data):
        # A marker is two bytes: one that starts on the window's last byte is found in it.
        window_end = min(offset + SCAN_WINDOW, len(data))
        match = JPEG_SCAN_MARKER.search(data, offset, window_end + 1)
        if match is None:
            offset = window_end
            if release:
                release(offset)
            continue
        if data[match.start() + 1] == JPEG_EOI[1]:
            pieces.append(slice(kept_from, match.end()))
            return pieces, kept_from != start or match.end() < len(data)
        segment_end = match.end() + int.from_bytes(data[match.end() : match.end() + 2], "big")
        if segment_end > len(data):
            break
        if _is_metadata(data, data[match.start() + 1], match.end()):
            pieces.append(slice(kept_from, match.start()))
            kept_from = segment_end
        offset = max(segment_end, match.end())  # its contents are no markers
    pieces.append(slice(kept_from, len(data)))  # no end where one was expected: keep the rest as it is
    return pieces, kept_from != start


def _strip_png(data):
    kept, removed, exif_seen = [slice(0, len(PNG_SIGNATURE))], False, False
    for kind, start, end in _png_chunks(data):
        if kind not in PNG_METADATA:
            kept.append(slice(start, end))
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
        return None
    return kept  # and nothing of what followed IEND


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
