"""`codegen-lm serve`: the HTTP server (OpenAI-compatible completions, editor routes, metrics, playground)."""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from .common import CliError, add_engine_options, add_model_options, engine_options, load_model, number


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model over HTTP (OpenAI-compatible, editor routes)",
                       description="Serve a model over HTTP: OpenAI's completions API, the editor ecosystem's "
                                   "routes (copilot / FauxPilot, llm-ls / TGI), /metrics and a playground page.")
    add_model_options(p)
    add_engine_options(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=number(int, 0, 65535, what="must be in [0, 65535]"), default=8000)
    p.add_argument("--api-key", default=os.environ.get("CODEGEN_LM_API_KEY"),
                   help="require this key (Authorization: Bearer KEY); default: $CODEGEN_LM_API_KEY, or none")
    p.add_argument("--max-batch", type=number(int, 1, 1024, what="must be in [1, 1024]"), default=16,
                   help="KV slots: samples decoded together across all clients (default 16)")
    p.add_argument("--max-queue", type=number(int, 0, what="must be >= 0"), default=64,
                   help="samples that may wait for a slot; beyond, requests get 429 (default 64)")
    p.add_argument("--speculative", choices=["off", "prompt-lookup"], default="off",
                   help="speculative decoding for every request (prompt lookup: guesses copied from the context)")
    p.add_argument("--served-model-name", default=None,
                   help="the model's name in /v1/models and responses (default: the --model name)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..engine import Engine
    from ..server import ServerContext, create_app

    try:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((args.host, args.port))
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    model, tokenizer = load_model(args)
    try:
        engine = Engine(model, tokenizer, max_batch=args.max_batch, speculative=args.speculative,
                        **engine_options(args))
    except ValueError as exc:
        raise CliError(str(exc)) from None
    name = args.served_model_name or args.model
    aliases = tuple({args.model, Path(args.model).name} - {name})
    ctx = ServerContext(engine, tokenizer, name, aliases, api_key=args.api_key or None, max_queue=args.max_queue)
    app = create_app(ctx)
    sock.listen(2048)  # connections made from now on wait for uvicorn instead of being refused
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"codegen-lm: serving {name} on http://{shown}:{port} (playground at /, OpenAI API at /v1)",
          file=sys.stderr, flush=True)
    config = uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
    return 0
