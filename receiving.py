"""Receiving request bodies below Flask: admission, socket timeouts, spooling and the upload's file part.

gunicorn's gthread worker spends a thread on every request for as long as its client takes to
send it, so workers have many threads (gunicorn.conf.py) for slow clients to wait on. Running
them all at once on one core would only add GIL contention (64 threads: analyze p99 at 7x its
p50), so ``Admission`` receives upload and analyze bodies first, then lets a few requests run at
once, in order of arrival. An upload's file part is found as the body arrives and written to a
spool (memory, then a file), so a body waiting for its turn holds little memory.
"""

import collections
import contextlib
import re
import threading
import time
from dataclasses import dataclass

from gunicorn.http.body import Body as GunicornBody
from gunicorn.http.body import LengthReader as GunicornLengthReader
from werkzeug.http import parse_options_header
from werkzeug.wsgi import get_content_length

import storage

RECEIVED = "receiving.received"  # environ key: the Received body of an upload or analyze
STARTED = "receiving.started"  # environ key: when Admission took the request, for its logged duration
# The receive buffer. Larger ones mean fewer recv() calls, each of which may wait for the GIL.
WINDOW_BYTES = 256 * 1024
MAX_PARTS = 1000
MAX_PART_HEADER_BYTES = 16 * 1024

_LINE_BREAK = re.compile(rb"\r\n|\n|\r")
_BLANK_LINE = re.compile(rb"\r\n\r\n|\r\r|\n\n")
_BLANKS = re.compile(rb"[ \t]*")
_SPACE = b" \t"
_CR, _LF = 13, 10


class ReceiveError(Exception):
    """Base of what makes a request body unacceptable before any route sees it."""


class RequestTimeout(ReceiveError):
    """The client stopped sending its body for longer than the socket timeout."""


class IncompleteBody(ReceiveError):
    """The body ended before its declared length or its last chunk."""


class InvalidBody(ReceiveError):
    """The body's transfer encoding is malformed."""


class NotMultipart(ReceiveError):
    """An upload that is not multipart/form-data."""


class InvalidMultipart(ReceiveError):
    """A multipart body that is malformed."""

    def __init__(self, detail):
        super().__init__(f"The multipart body is malformed: {detail}.")


@dataclass
class Received:
    """A body received before its request runs: ``data`` (analyze) or ``file`` (upload), or its ``error``.

    ``size`` is how many bytes of the body were read; ``file`` is the Spool holding the first
    part named ``file`` (None when there is none), and ``file_too_large`` says that it holds
    only the beginning of a part over the file limit.
    """

    size: int = 0
    data: bytes = b""
    file: storage.Spool | None = None
    file_too_large: bool = False
    error: Exception | None = None


class FairGate:
    """A semaphore that lets waiting threads in by order of arrival.

    threading.Semaphore lets a thread that just arrived take a freed slot ahead of those already
    waiting, and under load some requests then wait many turns (analyze p99 at 7x its p50).
    """

    def __init__(self, slots):
        self._lock = threading.Lock()
        self._free = slots
        self._waiting = collections.deque()

    def __enter__(self):
        with self._lock:
            if self._free:  # never while others wait: __exit__ hands its slot to the first of them
                self._free -= 1
                return
            turn = threading.Lock()
            turn.acquire()
            self._waiting.append(turn)
        turn.acquire()

    def __exit__(self, *exc_info):
        with self._lock:
            if self._waiting:
                self._waiting.popleft().release()
            else:
                self._free += 1

    @contextlib.contextmanager
    def paused(self):
        """Give a slot this thread holds to the next in line, and queue for one again afterwards."""
        self.__exit__()
        try:
            yield
        finally:
            self.__enter__()


class Admission:
    """WSGI middleware: receive a request's body first, then let ``slots`` requests run at once.

    Only POSTs to ``upload_paths`` and ``analyze_paths`` that ``may_receive(environ)`` allows
    (a valid key, and for an upload its rate limit not reached) are received, and only with a
    Content-Length within their limit (a chunked body is read up to one byte over it); the
    routes refuse the rest unread. ``unqueued_paths`` (the health check, the metrics) skip the
    queue: the platform must not see a busy worker as a dead one, nor a scrape wait.
    ``metrics`` counts the waits (metrics.Metrics or metrics.NoMetrics).
    """

    def __init__(
        self,
        app,
        *,
        upload_paths,
        analyze_paths,
        unqueued_paths,
        may_receive,
        upload_limit,
        file_limit,
        analyze_limit,
        client_timeout,
        spool,
        slots,
        metrics,
    ):
        self.app = app
        self.upload_paths = upload_paths
        self.analyze_paths = analyze_paths
        self.unqueued_paths = unqueued_paths
        self.may_receive = may_receive
        self.upload_limit = upload_limit
        self.file_limit = file_limit
        self.analyze_limit = analyze_limit
        self.client_timeout = client_timeout
        self.spool = spool
        self.gate = FairGate(slots)
        self.metrics = metrics
        self._windows = _BufferPool(WINDOW_BYTES)

    def __call__(self, environ, start_response):
        environ[STARTED] = time.perf_counter()
        if "gunicorn.socket" in environ:
            # gunicorn's threads read and write on a blocking socket with no timeout: a client that
            # stops sending, or stops reading its answer, would hold a thread for ever.
            environ["gunicorn.socket"].settimeout(self.client_timeout)
        path = environ.get("PATH_INFO")
        limit = (
            self.upload_limit
            if path in self.upload_paths
            else self.analyze_limit
            if path in self.analyze_paths
            else None
        )
        if limit is not None and environ["REQUEST_METHOD"] == "POST" and self.may_receive(environ):
            length = get_content_length(environ)
            if length is None and environ.get("wsgi.input_terminated"):  # chunked, delimited by the server
                environ[RECEIVED] = self._receive(environ, path, limit + 1, None)
            elif length is None and "HTTP_TRANSFER_ENCODING" not in environ:  # no body at all
                environ[RECEIVED] = self._receive(environ, path, 0, 0)
            elif length is not None and length <= limit:
                environ[RECEIVED] = self._receive(environ, path, length, length)
        try:
            if path in self.unqueued_paths:
                return self.app(environ, start_response)
            queued = time.perf_counter()
            self.metrics.waiting(1)
            with self.gate:
                self.metrics.waiting(-1)
                self.metrics.queued(time.perf_counter() - queued)
                return self.app(environ, start_response)
        finally:
            received = environ.get(RECEIVED)
            if received is not None and received.file is not None:  # also when refused unread
                received.file.close()

    def _receive(self, environ, path, size, length):
        """Read up to ``size`` bytes of a body of ``length`` (None: chunked) into a Received."""
        received = Received()
        body = _body_reader(environ, length)
        try:
            with self._windows.buffer() as window:
                if path in self.upload_paths:
                    self._receive_upload(environ, body, size, length, window, received)
                else:
                    received.data = _read_all(body, size, window, received)
        except ReceiveError as error:
            received.error = error
        if received.error is None and length is not None and received.size < length:
            received.error = IncompleteBody("The request body ended before its declared Content-Length.")
        if received.error is not None and received.file is not None:
            received.file.close()
            received.file = None
        return received

    def _receive_upload(self, environ, body, size, length, window, received):
        """Find the file part while the body arrives and spool it; keep reading the body after an error.

        The error is only reported once the whole body is read: a client still sending when the
        answer comes back may never see it, as the server closes the connection on an unread part.
        """
        mimetype, options = parse_options_header(environ.get("CONTENT_TYPE", ""))
        boundary = options.get("boundary", "")
        parser = None
        if mimetype != "multipart/form-data":
            received.error = NotMultipart(
                "Send the image as multipart/form-data with the file in a field named 'file'."
            )
        elif not 0 < len(boundary) <= 200 or not boundary.isascii():
            received.error = InvalidMultipart("the Content-Type has no usable boundary")
        else:
            received.file = self.spool(length, "HTTP_IDEMPOTENCY_KEY" in environ)
            parser = FilePartParser(boundary.encode(), received.file.write, self.file_limit)
        view, filled = memoryview(window), 0
        while received.size < size and (count := body(view[filled : filled + size - received.size])):
            received.size += count
            filled += count
            if parser is None:  # nothing more to find: the rest is only read
                filled = 0
                continue
            try:
                consumed = parser.feed(window, filled)
                if not consumed and filled == len(window):
                    raise InvalidMultipart(f"a boundary line is longer than {len(window)} bytes")
            except (InvalidMultipart, storage.StorageError) as error:
                received.error, parser, filled = error, None, 0
                continue
            view[: filled - consumed] = view[consumed:filled]
            filled -= consumed
        # Only a whole body is parsed to its end: a short one is incomplete, and a chunked one
        # that filled ``size`` is over the limit.
        complete = received.size == length if length is not None else received.size < size
        if parser is None or not complete:
            return
        try:
            parser.feed(window, filled, final=True)
        except (InvalidMultipart, storage.StorageError) as error:
            received.error = error
            return
        if not parser.found:
            received.file.close()
            received.file = None
        received.file_too_large = parser.too_large


def _read_all(body, size, window, received):
    """Read up to ``size`` bytes (an analyze body, a few KiB) into bytes."""
    view = memoryview(window)[:size] if size <= len(window) else memoryview(bytearray(size))
    while received.size < size and (count := body(view[received.size :])):
        received.size += count
    return bytes(view[: received.size])


def _body_reader(environ, length):
    """A function that fills a memoryview with the next bytes of the body and says how many; 0 at its end."""
    stream, sock = environ["wsgi.input"], environ.get("gunicorn.socket")
    if (
        length is not None
        and sock is not None
        and type(stream) is GunicornBody
        and type(stream.reader) is GunicornLengthReader
        and stream.reader.length == length
        and stream.buf.tell() == 0
    ):
        return _SocketReader(stream, sock)

    def read(view):
        with _read_errors():
            data = stream.read(len(view))
        view[: len(data)] = data
        return len(data)

    return read


@contextlib.contextmanager
def _read_errors():
    """Turn what reading a body raises into ReceiveErrors."""
    try:
        yield
    except TimeoutError:
        raise RequestTimeout("The client stopped sending its request body.") from None
    except OSError:  # the client went away mid-body; the answer is for the case it still listens
        raise IncompleteBody("The request body ended before it was complete.") from None
    except Exception:  # the server's own parse errors, such as gunicorn's for bad chunked encoding
        raise InvalidBody("The request body's transfer encoding is malformed.") from None


class _SocketReader:
    """A body of known length read from gunicorn's socket straight into the receive buffer.

    gunicorn's own reader copies each received megabyte several times (BytesIO writes,
    getvalue(), slices): 1.0 ms of CPU per 1 MB body on one core here, against 0.17 ms with
    recv_into() (a bare WSGI app under the same gunicorn, wrk, 8 connections). What gunicorn read
    ahead with the headers comes first, and what follows the body stays with it. Its reader's
    count of the body's unread bytes is kept exact, so after the response it drains or closes
    the connection as it would have; after a failed read it closes it.
    """

    def __init__(self, stream, sock):
        self.stream = stream
        self.sock = sock
        unreader = stream.reader.unreader
        head = unreader.take_buffered()
        length = stream.reader.length
        if len(head) > length:  # the next request, pipelined behind this one
            unreader.unread(head[length:])
            head = head[:length]
        self.head = memoryview(head)
        stream.reader.length = length - len(head)

    def __call__(self, view):
        if self.head:
            count = min(len(view), len(self.head))
            view[:count] = self.head[:count]
            self.head = self.head[count:]
            return count
        reader = self.stream.reader
        if not reader.length:
            return 0
        try:
            with _read_errors():
                count = self.sock.recv_into(view, min(len(view), reader.length))
        except ReceiveError:
            self.stream.failed = True  # where the next request starts is unknown now: close
            raise
        if not count:  # the client closed its side before the end of the body
            self.stream.failed = True
        reader.length -= count
        return count


class _BufferPool:
    """Receive buffers for reuse: a fresh one costs page faults on every request."""

    def __init__(self, size, spare=8):
        self.size = size
        self.spare = spare
        self._free = []
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def buffer(self):
        with self._lock:
            buffer = self._free.pop() if self._free else None
        if buffer is None:
            buffer = bytearray(self.size)
        try:
            yield buffer
        finally:
            with self._lock:
                if len(self._free) < self.spare:
                    self._free.append(buffer)


class FilePartParser:
    """Find the first part named ``name`` of a multipart/form-data body (RFC 7578) as the body arrives.

    feed() is given the bytes not consumed yet at the start of a buffer and returns how many it
    consumed; the caller moves the rest (a delimiter or part headers cut short by the end of what
    has arrived) to the buffer's start, ahead of what arrives next. The part's content goes to
    ``write`` as it is found, up to ``limit`` bytes (beyond that ``too_large`` is set and the rest
    only counted). A part counts whether or not it has a ``filename`` parameter: some clients
    omit it. The whole body must be well formed up to its closing delimiter. Line breaks may be
    CRLF, LF or CR, as Werkzeug's parser accepts, and a delimiter only counts where it starts a
    line and is followed by ``--`` or by optional blanks and a line break.

    Hand-written because it is clearly the fastest and agrees with Werkzeug: per 1 MB body fed
    in 256 KiB pieces, 0.12 ms against 0.15 ms for python-multipart (which also refuses legal
    bodies Werkzeug accepts: a preamble, LF line breaks, folded headers) and 0.95 ms for
    Werkzeug's own MultipartDecoder (test_receiving.py checks it against that decoder).
    """

    PREAMBLE, HEADERS, CONTENT, EPILOGUE = range(4)

    def __init__(self, boundary, write, limit, name="file"):
        self.delimiter = b"--" + boundary
        self.write = write
        self.limit = limit
        self.name = name
        self.found = False  # a part called name has begun
        self.size = 0  # bytes of its content so far
        self.too_large = False
        self._state = self.PREAMBLE
        self._parts = 0
        self._in_part = False  # the current part is the one wanted
        self._headers_from = 0  # where the current part's headers begin
        self._blank_from = 0  # where the blank line that ends them may begin
        self._content_from = 0  # where its content not yet written begins
        self._search_from = 0  # where the line break of its closing delimiter may begin

    def feed(self, buffer, end, final=False):
        """Parse ``buffer[:end]``; return how many bytes are consumed. With ``final``, that is the end."""
        consumed = self._parse(buffer, end, final)
        self._headers_from = max(0, self._headers_from - consumed)
        self._blank_from = max(0, self._blank_from - consumed)
        self._content_from = max(0, self._content_from - consumed)
        self._search_from = max(0, self._search_from - consumed)
        return consumed

    def _parse(self, buffer, end, final):
        while True:
            if self._state == self.EPILOGUE:
                return end
            if self._state == self.HEADERS:
                if not self._headers(buffer, end, final):
                    return self._headers_from
                continue
            preamble = self._state == self.PREAMBLE
            line_start, after, closed = self._delimiter_line(buffer, self._search_from, end, final, preamble)
            if after is None:  # none yet: what may be the start of one is kept
                if final:
                    raise InvalidMultipart("the closing boundary is missing")
                self._emit(buffer, line_start)
                return line_start
            if not preamble:
                self._emit(buffer, line_start)
            if closed:
                self._state = self.EPILOGUE
                continue
            self._parts += 1
            if self._parts > MAX_PARTS:
                raise InvalidMultipart(f"it has more than {MAX_PARTS} parts")
            self._state, self._headers_from, self._blank_from, self._in_part = (
                self.HEADERS,
                after,
                after,
                False,
            )

    def _headers(self, buffer, end, final):
        """Parse the current part's headers; False when they are not all there yet."""
        start = self._headers_from
        # Searched within a bound: part headers are a few lines, and parsing megabytes of them
        # would cost seconds of CPU. And from where the last search stopped, less the 3 bytes a
        # blank line cut short may have: headers sent a byte at a time cost 0.8 s of CPU when
        # searched from their start each time.
        blank = _BLANK_LINE.search(buffer, self._blank_from, min(end, start + MAX_PART_HEADER_BYTES))
        if blank is None:
            if final or end - start >= MAX_PART_HEADER_BYTES:
                raise InvalidMultipart(f"a part's headers do not end within {MAX_PART_HEADER_BYTES} bytes")
            self._blank_from = max(start, end - 3)
            return False
        if blank.end() == end and not final and buffer[blank.start()] == buffer[blank.start() + 1] == _CR:
            return False  # "\r\r" then maybe "\n": one more byte decides where the content starts
        headers = _part_headers(buffer[start : blank.start()])
        disposition = headers.get("content-disposition")
        if disposition is None:
            raise InvalidMultipart("a part has no Content-Disposition header")
        _, params = parse_options_header(disposition)
        self._in_part = not self.found and params.get("name") == self.name
        self.found = self.found or self._in_part
        # The blank line's second line break opens the content and may also be the one
        # that precedes the next delimiter, which makes the content empty.
        second_break = (blank.start() + blank.end()) // 2
        self._content_from = _LINE_BREAK.match(buffer, second_break).end()
        self._search_from = second_break
        self._state = self.CONTENT
        return True

    def _emit(self, buffer, until):
        """Hand the wanted part's content up to ``until`` to ``write``."""
        start = self._content_from
        if until <= start:
            return
        self._content_from = until
        if not self._in_part:
            return
        self.size += until - start
        if self.size > self.limit:
            self.too_large = True
        if not self.too_large:
            self.write(memoryview(buffer)[start:until])

    def _delimiter_line(self, buffer, start, end, final, preamble):
        """Find the first delimiter line whose line break begins at or after ``start``.

        Returns ``(line_start, after, closed)``: where its leading line break begins, where the
        next part begins, and whether it is the closing delimiter. When there is none (yet),
        ``after`` is None and ``line_start`` is where one cut short by ``end`` may begin. Only
        the first delimiter, after the preamble, may stand without a line break before it.
        """
        delimiter = self.delimiter
        search = start
        while True:
            at = buffer.find(delimiter, search, end)
            if at == -1:
                cut = end - len(delimiter) + 1 - (0 if preamble else 2)
                return (end if final else max(start, cut)), None, None
            search = at + 1
            if preamble:
                line_start = at
            elif at - 2 >= start and buffer[at - 2] == _CR and buffer[at - 1] == _LF:
                line_start = at - 2
            elif at - 1 >= start and buffer[at - 1] in (_CR, _LF):
                line_start = at - 1
            else:
                continue
            after = at + len(delimiter)
            dashes = buffer[after : min(end, after + 2)]
            if not final and len(dashes) < 2 and b"--".startswith(dashes):
                return line_start, None, None
            closed = dashes == b"--"
            if closed:
                after += 2
            after = _BLANKS.match(buffer, after, end).end()
            if after == end and not final or after + 1 == end and buffer[after] == _CR and not final:
                return line_start, None, None  # what follows decides
            if after < end and buffer[after] in (_CR, _LF):
                return line_start, _LINE_BREAK.match(buffer, after).end(), closed
            if closed:
                return line_start, after, closed


def _part_headers(block):
    """Parse a part's header block into a dict of lowercase names to the first value of each."""
    headers = {}
    unfolded = re.sub(rb"(?:\r\n|\n|\r)[ \t]", b" ", bytes(block))
    for line in unfolded.splitlines():
        line = line.strip(_SPACE)
        if not line:
            continue
        try:
            text = line.decode()
        except UnicodeDecodeError:
            raise InvalidMultipart("a part header is not UTF-8") from None
        header, _, value = text.partition(":")
        headers.setdefault(header.strip(" \t").lower(), value.strip(" \t"))
    return headers
