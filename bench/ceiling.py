"""Same-durability ceiling: the service's durable write of each upload and nothing else, under its gunicorn command."""

import json
import os
import uuid

import storage
from bench.bare import serve

UPLOADS = storage.Folder(os.environ.get("UPLOAD_DIR", "uploads"))


def app(environ, start_response):
    """Answer as bench/bare.py does, but store each upload's body durably first."""
    return serve(environ, start_response, _store)


def _store(body):
    image_id = str(uuid.uuid4())
    # The service's own durable write of a photo (temp file, fsync, its pages dropped from the
    # page cache, rename, folder fsync), none of its checks.
    UPLOADS.write_new(f"{UPLOADS.folder}/{image_id}.jpg", body, replace=True, evict=True)
    return json.dumps({"image_id": image_id}).encode()
