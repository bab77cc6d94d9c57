"""gunicorn settings for pagedecode: one gthread worker = one Engine (one copy of the weights and
the KV cache) per process; many threads, because every streaming client holds one while it reads."""

wsgi_app = "wsgi:app"
bind = "127.0.0.1:8000"
worker_class = "gthread"
workers = 1            # one engine per process; scale out with replicas behind a load balancer
threads = 512          # streaming clients (SSE, WebSocket) each hold a thread while connected, queued ones
                       # too: a CUDA server admits 256 at once (max_concurrent_requests) and queues more
timeout = 300          # the worker heartbeat; streams themselves may run longer than this
graceful_timeout = 30
keepalive = 5
preload_app = False    # the engine thread must start inside the worker, not in the master
accesslog = "-"
errorlog = "-"
loglevel = "info"
# The model takes seconds to load; the worker answers /health with 503 meanwhile.


def worker_exit(server, worker):
    """Stop the engine thread cleanly when the worker exits."""
    runtime = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("pagedecode")
    if runtime is not None:
        runtime.close()
