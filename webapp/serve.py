"""`pagedecode serve`: run the web app under gunicorn, programmatically (no shell wrapper).

Settings come from config/gunicorn.conf.py; --host/--port replace its bind. The engine options
(--backend, --threads, --kv-cache-mb, --model, --config) reach create_app, which builds the
Engine inside the worker.
"""
from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

# See wsgi.py: spinning OpenMP pools (torch's and the native library's) starve each other when the
# engine runs on a background thread. Set here, before the worker (forked from this process)
# loads torch; importing webapp does not load torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from gunicorn.app.base import BaseApplication

GUNICORN_CONF = Path(__file__).resolve().parent.parent / "config" / "gunicorn.conf.py"


def app_config(args) -> dict:
    """create_app's settings from the CLI flags (None flags leave the runtime config's values)."""
    engine = {"backend": args.backend}
    if getattr(args, "threads", None):
        engine["num_threads"] = args.threads
    if getattr(args, "kv_cache_mb", None):
        engine["kv_cache_mb"] = args.kv_cache_mb
    config = {"ENGINE": engine}
    if getattr(args, "config", None):
        config["RUNTIME_CONFIG"] = args.config
    if getattr(args, "model", None):
        config["MODEL_PATH"] = args.model
    return config


class PagedecodeServer(BaseApplication):
    """gunicorn with our config file's settings; the app is built in the worker (not preloaded)."""

    def __init__(self, config: dict, bind: str, conf_path: Path = GUNICORN_CONF):
        self._config, self._bind, self._conf_path = config, bind, conf_path
        super().__init__()

    def load_config(self) -> None:
        settings = {k: v for k, v in runpy.run_path(str(self._conf_path)).items()
                    if k in self.cfg.settings and k != "wsgi_app"}
        for key, value in settings.items():
            self.cfg.set(key, value)
        self.cfg.set("bind", [self._bind])

    def load(self):
        from webapp import create_app
        return create_app(self._config)


def serve(args) -> int:
    """Start gunicorn on args.host:args.port and print the URL; returns when gunicorn exits."""
    host = "[" + args.host + "]" if ":" in args.host else args.host
    bind = f"{host}:{args.port}"
    print(f"pagedecode: serving on http://{bind}/  (the model loads in the background; "
          f"GET /health says when it is ready)", file=sys.stderr, flush=True)
    PagedecodeServer(app_config(args), bind).run()
    return 0
