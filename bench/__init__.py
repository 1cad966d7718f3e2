"""Benchmark of the service against a FastAPI reference and gunicorn ceilings; run with .venv/bin/python bench/run.py."""
