"""`borahub serve`: the OpenAI-compatible server of hub/server.py."""
from __future__ import annotations

from .route import MODES


def cmd_serve(args) -> int:
    from hub.server import serve

    serve(args.config, args.host, args.port, max_rows=args.max_batch, max_queue=args.max_queue, timeout=args.timeout,
          max_tokens=args.max_tokens, mode=args.mode, backend=args.backend)
    return 0


def add_commands(sub) -> None:
    from hub.router_cli import _checked, _new_tokens, _positive

    port = _checked(int, lambda n: 0 <= n <= 65535, "a port number (0-65535)")
    seconds = _checked(float, lambda x: 0 < x <= 86400, "seconds in (0, 86400]")
    p = sub.add_parser("serve", help="serve the hub over the OpenAI API (routes every request)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=port, default=8000, help="port (default 8000)")
    p.add_argument("--mode", choices=MODES, default="fallback", help="routing mode of model 'auto' (default fallback)")
    p.add_argument("--max-batch", type=_positive, default=16, help="rows decoded together (default 16)")
    p.add_argument("--max-queue", type=_positive, default=64, help="waiting requests before 429s (default 64)")
    p.add_argument("--timeout", type=seconds, default=600.0, help="seconds a request may take, queue included")
    p.add_argument("--max-tokens", type=_new_tokens, default=128, help="new tokens when a request names none")
    p.add_argument("--backend", help="generate on this OpenAI-compatible server (URL); route here")
    p.set_defaults(func=cmd_serve, long_lived=True)  # keeps the system allocator (hub/cli.py one_job)
