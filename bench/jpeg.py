"""Make the benchmark's photos: valid baseline JPEGs of an exact size, with a phone camera's Exif.

The scan data is random, as entropy-coded data looks, and every bit of it decodes: the AC table
codes "a coefficient of 10 random bits" as 1110 and "end of block" as 0, so random coefficient
bits around fixed code bits form a real scan, byte-stuffed like any other (every 0xFF followed
by 0x00, here about one per 230 bytes; camera JPEGs measured here had one per 235 to 350). The
service's marker scan then walks data like a camera's, and its metadata stripping has a real
Exif block (GPS IFD, Orientation 6, maker note, thumbnail) to cut.
"""

import math
import random
import struct

SOI, EOI = b"\xff\xd8", b"\xff\xd9"
APP0, APP1, DQT, SOF0, DHT, SOS = 0xE0, 0xE1, 0xDB, 0xC0, 0xC4, 0xDA
JFIF = b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00"  # version 1.01, no units, 1:1, no thumbnail
# Huffman code lengths as DHT stores them: 16 counts (codes of length 1 to 16), then the symbols.
# DC: one code, "0", for category 1 (a difference of -1 or +1, one extra bit).
DC_TABLE = bytes([0x00, 1, *[0] * 15, 0x01])
# AC: "0" for end of block, "10" and "110" for sizes 1 and 2 (never used), "1110" for run 0 /
# size 10 (a coefficient of 10 extra bits). A code that is mostly 1 bits makes 0xFF bytes as
# often as in camera files, whose long codes are mostly 1 bits too.
AC_TABLE = bytes([0x10, 1, 1, 1, 1, *[0] * 12, 0x00, 0x01, 0x02, 0x0A])
# Per block, as bit-pattern pieces: "r" is a random bit, "0"/"1" a fixed code bit.
DC_BITS, AC_BITS, EOB_BITS = "0r", "1110" + "r" * 10, "0"
MAX_AC = 62  # coefficients coded per block; the 63rd would end the block without its EOB code
UNSIZED_COEFFICIENTS = 8  # coefficients per block of an image with no target size
TIFF_TYPES = {
    "BYTE": 1,
    "ASCII": 2,
    "SHORT": 3,
    "LONG": 4,
    "RATIONAL": 5,
    "UNDEFINED": 7,
    "SLONG": 9,
    "SRATIONAL": 10,
}
TIFF_FORMATS = {1: "B", 3: "H", 4: "I", 5: "I", 9: "i", 10: "i"}
APPLE_MAKER_NOTE = b"Apple iOS\x00\x00\x01MM"  # then an IFD whose offsets count from the note's start
EXIF_IFD, GPS_IFD, THUMBNAIL_AT, THUMBNAIL_LENGTH = 0x8769, 0x8825, 0x0201, 0x0202


def make_jpeg(width=16, height=8, size=None, exif=True, seed=0):
    """A baseline greyscale JPEG of ``width`` x ``height``, exactly ``size`` bytes when given.

    ``exif`` adds a phone camera's APP1 segment; ``seed`` makes otherwise equal images differ.
    Raises ValueError when ``size`` cannot be reached with that many pixels.
    """
    blocks = math.ceil(width / 8) * math.ceil(height / 8)
    head = b"".join(
        [
            SOI,
            _segment(APP0, JFIF),
            _segment(APP1, b"Exif\x00\x00" + phone_exif(width, height, seed)) if exif else b"",
            # All ones: the random coefficients stay in range once dequantized.
            _segment(DQT, b"\x00" + b"\x01" * 64),
            _segment(SOF0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00"),
            _segment(DHT, DC_TABLE),
            _segment(DHT, AC_TABLE),
            _segment(SOS, b"\x01\x01\x00\x00\x3f\x00"),
        ]
    )
    if size is None:
        return head + _stuffed(_scan(blocks, [UNSIZED_COEFFICIENTS], blocks, seed)) + EOI
    return head + _scan_of_size(blocks, size - len(head) - len(EOI), seed) + EOI


def _segment(marker, payload):
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def _scan_of_size(blocks, budget, seed):
    """Stuffed scan data for ``blocks`` blocks, exactly ``budget`` bytes long."""
    # Stuffing adds a byte per 0xFF, which is only known once the bits are drawn: draw once at
    # full size, then again with room for that many, and make up the last bytes with 0xFF fill
    # bytes, which may precede any marker (here EOI) and which decoders skip.
    unstuffed = budget
    while unstuffed > 0:
        scan = _stuffed(_scan_bits(blocks, unstuffed * 8, seed))
        if len(scan) <= budget:
            return scan + b"\xff" * (budget - len(scan))
        extra = len(scan) - unstuffed
        unstuffed = budget - extra - 2 * math.isqrt(extra) - 8
    raise ValueError(f"{budget} bytes of scan data are too few for {blocks} blocks")


def _scan_bits(blocks, bits, seed):
    """Unstuffed scan bytes for ``blocks`` blocks filling at most ``bits`` bits as evenly as possible."""
    per_block = bits // blocks
    if per_block < _block_bits(0):
        raise ValueError(f"{bits // 8} bytes of scan data are too few for {blocks} blocks")
    coefficients = min(MAX_AC, (per_block - _block_bits(0)) // len(AC_BITS))
    if coefficients == MAX_AC:
        raise ValueError(f"{bits // 8} bytes of scan data are too many for {blocks} blocks")
    # Some blocks get one coefficient more, so the total comes within one coefficient of ``bits``.
    fuller = min(blocks, (bits - blocks * _block_bits(coefficients)) // len(AC_BITS))
    return _scan(blocks, [coefficients + 1, coefficients], fuller, seed)


def _block_bits(coefficients):
    return len(DC_BITS) + coefficients * len(AC_BITS) + len(EOB_BITS)


def _scan(blocks, coefficients, first, seed):
    """Unstuffed scan bytes: ``first`` blocks of ``coefficients[0]`` coefficients, the rest of the last."""
    shapes = [DC_BITS + AC_BITS * count + EOB_BITS for count in coefficients]
    pattern = shapes[0] * first + shapes[-1] * (blocks - first)
    pattern += "1" * (-len(pattern) % 8)  # the last byte is padded with 1 bits, as the standard says
    # Fixed bits as an integer, and a mask of where the random ones go: two big-integer
    # operations instead of a Python loop over millions of bits.
    fixed = int(pattern.replace("r", "0"), 2)
    random_mask = int(pattern.replace("1", "0").replace("r", "1"), 2)
    length = len(pattern) // 8
    drawn = int.from_bytes(random.Random(seed).randbytes(length), "big")
    return ((drawn & random_mask) | fixed).to_bytes(length, "big")


def _stuffed(data):
    return data.replace(b"\xff", b"\xff\x00")


def phone_exif(width, height, seed=0):
    """A TIFF block as a phone camera writes it: IFD0 (Orientation 6), Exif and GPS IFDs, a thumbnail."""
    rng = random.Random(seed)
    stamp = "2026:11:20 14:03:27"
    ifd0 = [
        (0x010F, "ASCII", "Apple"),  # Make
        (0x0110, "ASCII", "iPhone 15 Pro"),  # Model
        (0x0112, "SHORT", [6]),  # Orientation: held upright, so stored rotated
        (0x011A, "RATIONAL", [(72, 1)]),  # XResolution
        (0x011B, "RATIONAL", [(72, 1)]),  # YResolution
        (0x0128, "SHORT", [2]),  # ResolutionUnit: inches
        (0x0131, "ASCII", "18.1"),  # Software
        (0x0132, "ASCII", stamp),  # DateTime
        (0x013C, "ASCII", "iPhone 15 Pro"),  # HostComputer
        (0x0213, "SHORT", [1]),  # YCbCrPositioning: centred
        (EXIF_IFD, "LONG", [0]),  # pointers, filled in once the layout is known
        (GPS_IFD, "LONG", [0]),
    ]
    exif_ifd = [
        (0x829A, "RATIONAL", [(1, 120)]),  # ExposureTime
        (0x829D, "RATIONAL", [(178, 100)]),  # FNumber
        (0x8822, "SHORT", [2]),  # ExposureProgram
        (0x8827, "SHORT", [64]),  # ISO
        (0x9000, "UNDEFINED", b"0232"),  # ExifVersion
        (0x9003, "ASCII", stamp),  # DateTimeOriginal
        (0x9004, "ASCII", stamp),  # DateTimeDigitized
        (0x9010, "ASCII", "+01:00"),  # OffsetTime
        (0x9201, "SRATIONAL", [(69077, 10000)]),  # ShutterSpeedValue
        (0x9202, "RATIONAL", [(16637, 10000)]),  # ApertureValue
        (0x9203, "SRATIONAL", [(52851, 10000)]),  # BrightnessValue
        (0x9204, "SRATIONAL", [(0, 1)]),  # ExposureBiasValue
        (0x9101, "UNDEFINED", b"\x01\x02\x03\x00"),  # ComponentsConfiguration: Y Cb Cr
        (0x9207, "SHORT", [5]),  # MeteringMode
        (0x9209, "SHORT", [16]),  # Flash: off
        (0x920A, "RATIONAL", [(6765, 1000)]),  # FocalLength
        (0x9214, "SHORT", [2009, 1502, 2208, 1327]),  # SubjectArea
        (0x927C, "UNDEFINED", _maker_note(rng)),  # MakerNote
        (0x9291, "ASCII", "512"),  # SubSecTimeOriginal
        (0xA000, "UNDEFINED", b"0100"),  # FlashpixVersion
        (0xA001, "SHORT", [0xFFFF]),  # ColorSpace: uncalibrated (Display P3)
        (0xA002, "LONG", [width]),  # PixelXDimension
        (0xA003, "LONG", [height]),  # PixelYDimension
        (0xA217, "SHORT", [2]),  # SensingMethod
        (0xA301, "UNDEFINED", b"\x01"),  # SceneType
        (0xA402, "SHORT", [0]),  # ExposureMode
        (0xA403, "SHORT", [0]),  # WhiteBalance
        (0xA405, "SHORT", [24]),  # FocalLengthIn35mmFilm
        (0xA433, "ASCII", "Apple"),  # LensMake
        (0xA434, "ASCII", "iPhone 15 Pro back triple camera 6.765mm f/1.78"),  # LensModel
    ]
    gps_ifd = [
        (0x0000, "BYTE", [2, 3, 0, 0]),  # GPSVersionID
        (0x0001, "ASCII", "N"),  # GPSLatitudeRef
        (0x0002, "RATIONAL", [(52, 1), (31, 1), (1244, 100)]),  # GPSLatitude
        (0x0003, "ASCII", "E"),  # GPSLongitudeRef
        (0x0004, "RATIONAL", [(13, 1), (24, 1), (3721, 100)]),  # GPSLongitude
        (0x0005, "BYTE", [0]),  # GPSAltitudeRef: above sea level
        (0x0006, "RATIONAL", [(38421, 1000)]),  # GPSAltitude
        (0x0007, "RATIONAL", [(13, 1), (3, 1), (27, 1)]),  # GPSTimeStamp
        (0x000C, "ASCII", "K"),  # GPSSpeedRef
        (0x000D, "RATIONAL", [(0, 1)]),  # GPSSpeed
        (0x0010, "ASCII", "T"),  # GPSImgDirectionRef
        (0x0011, "RATIONAL", [(2716, 10)]),  # GPSImgDirection
        (0x001D, "ASCII", "2026:11:20"),  # GPSDateStamp
        (0x001F, "RATIONAL", [(47, 10)]),  # GPSHPositioningError
    ]
    thumbnail = make_jpeg(160, 120, size=6_000, exif=False, seed=seed + 1)
    ifd1 = [
        (0x0103, "SHORT", [6]),  # Compression: JPEG
        (0x011A, "RATIONAL", [(72, 1)]),
        (0x011B, "RATIONAL", [(72, 1)]),
        (0x0128, "SHORT", [2]),
        (THUMBNAIL_AT, "LONG", [0]),
        (THUMBNAIL_LENGTH, "LONG", [len(thumbnail)]),
    ]
    # Big-endian, as Apple writes it; IFD0, Exif IFD, GPS IFD, IFD1, then the thumbnail.
    ifd0_at = 8
    exif_at = ifd0_at + _ifd_size(ifd0)
    gps_at = exif_at + _ifd_size(exif_ifd)
    ifd1_at = gps_at + _ifd_size(gps_ifd)
    thumbnail_at = ifd1_at + _ifd_size(ifd1)
    ifd0 = _with_value(_with_value(ifd0, EXIF_IFD, exif_at), GPS_IFD, gps_at)
    ifd1 = _with_value(ifd1, THUMBNAIL_AT, thumbnail_at)
    return b"".join(
        [
            b"MM\x00\x2a" + struct.pack(">I", ifd0_at),
            _ifd(ifd0, ifd0_at, next_ifd=ifd1_at),
            _ifd(exif_ifd, exif_at),
            _ifd(gps_ifd, gps_at),
            _ifd(ifd1, ifd1_at),
            thumbnail,
        ]
    )


def _maker_note(rng):
    """An Apple-style maker note: its header, then an IFD of the kind of values iPhones keep there."""
    entries = [
        (0x0001, "SLONG", [14]),  # MakerNoteVersion
        (0x0004, "SLONG", [1]),  # AEStable
        (0x0005, "SLONG", [186]),  # AETarget
        (0x0006, "SLONG", [179]),  # AEAverage
        (0x0007, "SLONG", [1]),  # AFStable
        (0x0008, "SRATIONAL", [(-9961, 10000), (-402, 10000), (-781, 10000)]),  # AccelerationVector
        (0x0011, "ASCII", "6F1C2B0E-7A3D-4E55-9C1B-2D8E4F6A0B3C"),  # MediaGroupUUID
        (0x0014, "SLONG", [12]),  # ImageCaptureType
        (0x0017, "SLONG", [8192]),  # LivePhotoVideoIndex
        # Vendors also keep opaque binary blocks there: a kilobyte in iPhone files.
        (0x0060, "UNDEFINED", rng.randbytes(1000)),
    ]
    return APPLE_MAKER_NOTE + _ifd(entries, len(APPLE_MAKER_NOTE))


def _with_value(entries, tag, value):
    return [(t, kind, [value] if t == tag else values) for t, kind, values in entries]


def _value_bytes(kind, values):
    """The count and big-endian bytes of one IFD entry's value."""
    code = TIFF_TYPES[kind]
    if kind == "ASCII":
        return len(values) + 1, values.encode("ascii") + b"\x00"
    if kind == "UNDEFINED":
        return len(values), values
    if kind in ("RATIONAL", "SRATIONAL"):
        flat = [part for pair in values for part in pair]
        return len(values), struct.pack(">" + TIFF_FORMATS[code] * len(flat), *flat)
    return len(values), struct.pack(">" + TIFF_FORMATS[code] * len(values), *values)


def _ifd_size(entries):
    size = 2 + 12 * len(entries) + 4
    for _, kind, values in entries:
        payload = _value_bytes(kind, values)[1]
        if len(payload) > 4:
            size += len(payload) + len(payload) % 2  # values start on even offsets
    return size


def _ifd(entries, offset, next_ifd=0):
    """One IFD at ``offset`` in the TIFF block: its entries, the next IFD's offset, then long values."""
    table, values = [struct.pack(">H", len(entries))], []
    values_at = offset + 2 + 12 * len(entries) + 4
    for tag, kind, given in sorted(entries):
        count, payload = _value_bytes(kind, given)
        if len(payload) <= 4:
            field = payload.ljust(4, b"\x00")
        else:
            field = struct.pack(">I", values_at)
            payload += b"\x00" * (len(payload) % 2)
            values.append(payload)
            values_at += len(payload)
        table.append(struct.pack(">HHI", tag, TIFF_TYPES[kind], count) + field)
    table.append(struct.pack(">I", next_ifd))
    return b"".join(table + values)
