"""Same-durability ceiling: the service's durable write of each upload and nothing else, under its gunicorn command."""

import json
import os
import uuid

import storage

UPLOADS = storage.Folder(os.environ.get("UPLOAD_DIR", "uploads"))
ANALYSIS = json.dumps(
    {"image_id": "00000000-0000-4000-8000-000000000000", "skin_type": "Oily", "issues": [], "confidence": 0.8}
).encode()


def app(environ, start_response):
    """Answer /health, /analyze and /upload with small fixed JSON; /upload stores the body durably first."""
    method, path = environ["REQUEST_METHOD"], environ["PATH_INFO"]
    if method == "GET" and path == "/health":
        return _json(start_response, "200 OK", b'{"status":"healthy"}')
    if method != "POST" or path not in ("/analyze", "/upload"):
        return _json(start_response, "404 Not Found", b'{"error":"not found"}')
    # Read the whole body in one call through gunicorn's reader, as bench/bare.py does.
    body = environ["wsgi.input"].read(int(environ.get("CONTENT_LENGTH") or 0))
    if path == "/analyze":
        return _json(start_response, "200 OK", ANALYSIS)
    image_id = str(uuid.uuid4())
    # The service's own durable write of a photo (temp file, fsync, its pages dropped from the
    # page cache, rename, folder fsync), none of its checks.
    UPLOADS.write_new(f"{UPLOADS.folder}/{image_id}.jpg", body, replace=True, evict=True)
    return _json(start_response, "201 Created", json.dumps({"image_id": image_id}).encode())


def _json(start_response, status, body):
    start_response(status, [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
