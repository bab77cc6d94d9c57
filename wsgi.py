"""gunicorn's entry point: `gunicorn -c config/gunicorn.conf.py wsgi:app`.

create_app() reads PAGEDECODE_CONFIG (which runtime config file) and PAGEDECODE_API_KEY; the
model loads on a background thread inside the worker, so /health answers 503 until it is ready.
"""
from webapp import create_app

app = create_app()
