"""An OpenAI-compatible HTTP API over one loaded engine (``moespeq serve``).

Starlette (ASGI) does the HTTP and uvicorn serves it; this package is the API: the routes and
streaming (app.py), the requests' validation (requests.py), the worker and its queue
(worker.py), who may reach the server (access.py) and the error object (errors.py).

- ``GET /health``, ``GET /v1/models`` (and ``/v1/models/{id}``), ``POST /v1/chat/completions``,
  ``POST /v1/completions``;
- one model, one generation at a time: a single worker thread owns the engine and takes
  requests in order from a bounded FIFO queue; a request that finds it full is answered
  503 with ``Retry-After``;
- streaming answers are ``text/event-stream``: ``data: {chunk}`` events, a last chunk
  with the ``finish_reason``, with ``stream_options.include_usage`` a chunk with
  ``choices: []`` and the usage, then ``data: [DONE]``;
- a client that disconnects cancels its generation (the worker checks after every
  token), so the next request starts at once;
- errors are OpenAI's error object ``{"error": {"message", "type", "param", "code"}}``:
  400 for a bad request, 401 without the key when ``--api-key`` is set, 404 for an
  unknown model, 413 for a body over 16 MiB, 503 when the queue is full; ``GET /health``
  answers 503 while the last answer failed reading the checkpoint's files and one is
  still changed;
- each response carries the run's statistics in a ``moespeq`` field, and the server log
  (stderr) has one line per request;
- Ctrl-C cuts the answer in progress after its current token (a long prompt's prefill
  ends first) and answers the queued requests 503, then uvicorn closes the connections
  and stops.
"""

from moespeq_cli.server.app import build_app
from moespeq_cli.server.errors import ApiError
from moespeq_cli.server.worker import HaltingServer, Job, Worker

__all__ = ["ApiError", "HaltingServer", "Job", "Worker", "build_app"]
