"""gunicorn's entry point: `gunicorn -c config/gunicorn.conf.py wsgi:app`.

create_app() reads PAGEDECODE_CONFIG (which runtime config file) and PAGEDECODE_API_KEY; the
model loads on a background thread inside the worker, so /health answers 503 until it is ready.
"""
import os

# The engine runs OpenMP kernels (torch's runtime and the native library's) from its own thread.
# With spinning waits the two thread pools starve each other on shared cores: generation measured
# 10-30x slower. Passive waits cost little. Must be set before torch or the native library loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from webapp import create_app  # noqa: E402

app = create_app()
