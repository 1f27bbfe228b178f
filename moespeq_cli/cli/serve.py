"""``moespeq serve``: an OpenAI-compatible HTTP server (moespeq_cli/server/) for one model."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from moespeq_cli.cli import options as o
from moespeq_cli.errors import CheckpointError, MoespeqError, Terminated, UsageError

EPILOG = """[bold]Examples[/bold]

  [dim]# the demo on http://127.0.0.1:8000/v1[/dim]
  moespeq serve

  moespeq serve qwen3-moe --vram 12GB --port 8080 --api-key "$KEY"

  curl http://127.0.0.1:8000/v1/chat/completions \\
    -H 'Content-Type: application/json' \\
    -d '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 32}'

  Any OpenAI client works: base_url http://127.0.0.1:8000/v1, the model name from GET /v1/models. One request \
is generated at a time; others wait in a queue of --queue.
"""


def check_template(engine, ctx: int) -> None:
    """A chat template no request can render (a syntax error, an unknown filter) is said
    before the weights load, not as every chat request's error."""
    from moespeq_cli.chat_template import TemplateError, check_compiles

    tok = engine.tokenizer
    if not tok.chat_template:
        return
    try:
        check_compiles(tok.chat_template, f"the chat template in {tok.template_source}")
    except TemplateError as e:
        raise CheckpointError(f"{e.what}; fix it (serve renders every chat request with it)") from None


def serve(
    model: o.ModelArg = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free one).")] = 8000,
    api_key: Annotated[
        Optional[str], typer.Option("--api-key", help="Require 'Authorization: Bearer KEY' on /v1/ requests.")
    ] = None,
    queue: Annotated[int, typer.Option("--queue", min=1, max=4096, help="Requests that may wait.")] = 16,
    default_max_tokens: Annotated[
        Optional[int],
        typer.Option(
            "--max-tokens",
            min=1,
            help="An answer's tokens when a request gives no max_tokens. Default: 512, or to the context's end.",
            show_default=False,
        ),
    ] = None,
    served_name: Annotated[
        Optional[str],
        typer.Option(
            "--served-model-name",
            help="The model's id in the API (as vLLM's option). Default: the model as given (an alias, a hub id, a path as typed).",
            show_default=False,
        ),
    ] = None,
    backend: o.Backend = "auto",
    hardware: o.Hardware = None,
    vram: o.Vram = None,
    ram: o.Ram = None,
    policy: o.Policy = "moespeq",
    cpu_experts: o.CpuExperts = None,
    draft: o.Draft = "auto",
    spec_depth: o.SpecDepth = "auto",
    cpu_threads: o.CpuThreads = None,
    dtype: o.Dtype = None,
    context: o.ConversationContext = None,
) -> None:
    """Serve a MoE model over an OpenAI-compatible HTTP API.

    GET /health, GET /v1/models (and /v1/models/ID), POST /v1/chat/completions and
    POST /v1/completions, streaming (Server-Sent Events) or not; requests are served one
    at a time, in order.
    """
    import uvicorn

    from moespeq_cli.cli.chat import load_session, note
    from moespeq_cli.cli.render import Renderer
    from moespeq_cli.server import HaltingServer, build_app

    if api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty; give a key or leave the option out")
    if served_name is not None and (not served_name.strip() or not served_name.isprintable()):
        raise UsageError("--served-model-name must be a printable, non-empty name (clients send it as 'model')")
    sock = listening_socket(host, port)  # before minutes of loading, not after; held, so --port 0's stays ours
    name, engine, ctx = load_session(model, context, 1, check=check_template, **o.engine_options(locals()))
    Renderer().plan(engine)
    from moespeq_cli.server.access import loopback

    if api_key is None and not loopback(host):  # (as llama-server and ollama leave it: said, not refused)
        note(f"note: --host {host} without --api-key: anyone who can reach this machine can use the model")
    if default_max_tokens is not None and default_max_tokens >= ctx:
        note(f"--max-tokens {default_max_tokens} is not less than the context: an answer ends where the context does")
    name = served_name or name
    address, port = sock.getsockname()[:2]  # (--port 0: the one the system gave)
    app = build_app(engine, name, ctx, api_key, queue, min(default_max_tokens or 512, ctx - 1), host, address)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on")
    shown = f"[{host}]" if ":" in host else host
    # said once the server listens: a script that waits for the line then connects
    server = HaltingServer(
        config, lambda: note(f"serving {name} on http://{shown}:{port}/v1 (context {ctx} tokens); Ctrl-C stops")
    )
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, Terminated):  # uvicorn shuts down on Ctrl-C or SIGTERM, then raises it again:
        pass  # the way to stop, not an error
    finally:
        engine.close()
        sock.close()
    note("stopped")


def listening_socket(host: str, port: int):
    """A socket bound to the address (free port, a local interface) for the server to
    listen on, else one line."""
    import errno
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror:
        raise UsageError(f"--host {host} is not an address of this machine; use 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, addr = infos[0]
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
    except OSError as e:
        s.close()
        # a port another program holds is this machine's state, not a bad command
        # line (exit 1); an address that is not this machine's is (exit 2)
        kind = MoespeqError if e.errno == errno.EADDRINUSE else UsageError
        raise kind(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port") from None
    return s
