"""Reference service for bench/run.py: the FastAPI shape a mobile team would deploy instead of ours.

Run it as bench/run.py does (one worker, uvloop and httptools from ``uvicorn[standard]``):

    uvicorn --factory bench.reference:create_app --host 127.0.0.1 --port 8001 --workers 1 \
        --loop uvloop --http httptools

What it does, as such services do: ``POST /upload`` takes FastAPI's ``UploadFile``
(python-multipart parses the body; Starlette spools the part in memory up to 1 MB, then in a
temporary file) and copies it with ``shutil.copyfileobj`` into UPLOAD_DIR under a uuid the
server picks, without fsync, answering 201 ``{"image_id": ...}``; ``POST /analyze`` takes JSON
``{"image_id": ...}``, checks the file exists and answers a small fixed-shape analysis derived
from the id's SHA-256; ``GET /health`` needs no key; every other route checks ``X-API-Key``
against API_KEY in a dependency. What it does not do, and ours does: check the bytes are an
image, limit the size, strip location metadata, make the file durable before answering,
idempotent retries, problem-details errors, stored analyses.

Logging is left as uvicorn ships it, access log on: ours writes one line per request itself,
so with uvicorn's access line both servers pay for one log line per request.
"""

import hashlib
import os
import secrets
import shutil
import uuid
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Security, UploadFile
from fastapi.security import APIKeyHeader
from pydantic import BaseModel

SKIN_TYPES = ("Normal", "Dry", "Oily", "Combination", "Sensitive")
ISSUES = ("Acne", "Redness", "Wrinkles", "Enlarged Pores", "Dark Circles", "Dehydration")
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False)


class AnalyzeRequest(BaseModel):
    """The body of POST /analyze."""

    image_id: uuid.UUID  # a UUID cannot name a path outside the uploads folder


def create_app():
    """Build the app from API_KEY and UPLOAD_DIR (read here, at start, not at import)."""
    api_key = os.environ["API_KEY"].encode()
    upload_dir = Path(os.environ.get("UPLOAD_DIR", "uploads"))
    upload_dir.mkdir(parents=True, exist_ok=True)

    def require_key(presented: str | None = Security(API_KEY_HEADER)):
        """Refuse the request with 401 unless it carries the configured key."""
        if presented is None or not secrets.compare_digest(presented.encode(), api_key):
            raise HTTPException(status_code=401, detail="Invalid or missing API key")

    api = APIRouter(dependencies=[Depends(require_key)])

    # A plain def: FastAPI runs it in its thread pool, as its documentation advises for blocking
    # file I/O, so the event loop keeps serving other connections while the file is copied.
    @api.post("/upload", status_code=201)
    def upload(file: UploadFile):
        """Store the uploaded file under a new id."""
        image_id = str(uuid.uuid4())
        with open(upload_dir / f"{image_id}.jpg", "wb") as stored:
            shutil.copyfileobj(file.file, stored)
        return {"image_id": image_id}

    @api.post("/analyze")
    async def analyze(body: AnalyzeRequest):
        """Return the mock analysis of a stored image."""
        image_id = str(body.image_id)
        if not (upload_dir / f"{image_id}.jpg").exists():
            raise HTTPException(status_code=404, detail="Image not found")
        digest = hashlib.sha256(image_id.encode()).digest()
        return {
            "image_id": image_id,
            "skin_type": SKIN_TYPES[digest[0] % len(SKIN_TYPES)],
            "issues": [issue for bit, issue in enumerate(ISSUES) if digest[1] >> bit & 1][:3],
            "confidence": round(0.70 + digest[2] % 30 / 100, 2),
        }

    app = FastAPI(title="Skin analysis reference")

    @app.get("/health")
    async def health():
        """Report that the service is up."""
        return {"status": "healthy"}

    app.include_router(api)
    return app
