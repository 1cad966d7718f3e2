"""Bare-WSGI ceiling: read the body, throw it away, answer fixed JSON; the least gunicorn can do per request."""

ANALYSIS = (
    b'{"image_id":"00000000-0000-4000-8000-000000000000","skin_type":"Oily","issues":[],"confidence":0.8}'
)
UPLOADED = b'{"image_id":"00000000-0000-4000-8000-000000000000"}'


def app(environ, start_response):
    """Answer /health, /analyze and /upload with fixed JSON, after reading the whole body."""
    return serve(environ, start_response, lambda body: UPLOADED)


def serve(environ, start_response, store):
    """Route as the service does; answer an upload with what ``store(body)`` returns (its JSON)."""
    method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
    if method == "GET" and path == "/health":
        return _json(start_response, "200 OK", b'{"status":"healthy"}')
    if method != "POST" or path not in ("/analyze", "/upload"):
        return _json(start_response, "404 Not Found", b'{"error":"not found"}')
    # One read of the whole body through gunicorn's reader, as any WSGI app may (the service reads
    # its uploads from the socket itself, receiving.py, which costs it less than this).
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    if path == "/analyze":
        return _json(start_response, "200 OK", ANALYSIS)
    return _json(start_response, "201 Created", store(body))


def _json(start_response, status, body):
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
