"""``moespeq serve`` driven by the official openai client over loopback: both endpoints,
streaming and not, stop strings, usage, concurrent clients, a disconnect mid-stream, and
bad requests."""

import json
import os
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

openai = pytest.importorskip("openai")


class SlowEngine:
    """An engine whose every generation takes ``seconds`` and yields nothing."""

    tokenizer = None  # never reached: generate yields no token

    def __init__(self, seconds: float):
        self.seconds = seconds

    def generate(self, *a, **kw):
        time.sleep(self.seconds)
        return iter(())


class EndlessEngine:
    """An engine that yields a token every 20 ms until its generator is closed."""

    last_stats = None

    class tokenizer:
        @staticmethod
        def decode(ids):
            return "x" * len(ids)

    def generate(self, *a, **kw):
        from types import SimpleNamespace

        while True:
            time.sleep(0.02)
            yield SimpleNamespace(token=1, eos=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(path, api_key=None, queue=16, server_class=None, **options):
    """``options``: the engine's (``ram``: a disk tier)."""
    import uvicorn

    from moespeq_cli.cli.chat import load_session
    from moespeq_cli.server import build_app

    name, engine, ctx = load_session(str(path), None, 1, backend="cpu", **options)
    app = build_app(engine, name, ctx, api_key, queue, 64)
    port = free_port()
    server = (server_class or uvicorn.Server)(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        assert time.time() < deadline, "the server did not start"
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}", name, engine


@pytest.fixture(scope="module")
def served(tiny):
    path, _ = tiny("mixtral", "gqa")
    server, thread, url, name, engine = start(path)
    yield url, name, engine
    server.should_exit = True
    thread.join(10)


def client(url, key="none"):
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def expected_text(engine, prompt_ids, n):
    """Greedy text for ``prompt_ids`` from the engine itself (no server)."""
    from moespeq_cli.conversation import complete
    from moespeq_cli.runtime.sampling import SamplingParams

    return complete(engine, prompt_ids, n, SamplingParams()).text


def test_models_and_health(served):
    url, name, _ = served
    assert [m.id for m in client(url).models.list().data] == [name]
    assert client(url).models.retrieve(name).id == name
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError):
        client(url).models.retrieve("org/gpt-4o")  # an id with a slash reaches the check
    assert httpx.get(url + "/v1/models/").json()["data"][0]["id"] == name
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_an_answer_failed_on_a_shard_cut_short_leaves_the_server_serving(tiny, tmp_path):
    """A shard cut short under the server (a sync tool rewriting it): that request fails
    (500) and /health says so (503); once the file is whole again /health is ok and the
    next request is answered, as a fresh server would. Before, the failed
    pass's pins and failed reads stayed in the RAM tier and every later request failed."""
    import shutil

    src, _ = tiny("mixtral", "wide")
    path = tmp_path / "ckpt"
    shutil.copytree(src, path)
    server, thread, url, name, engine = start(path, ram="1MB", policy="lru")
    try:
        assert engine.plan is not None and engine.plan.disk_tier
        body = {"model": name, "prompt": "hello there", "max_tokens": 16, "temperature": 0}
        want = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        shard = next(path.glob("*.safetensors"))
        whole, st = shard.read_bytes(), shard.stat()
        with open(shard, "r+b") as fh:
            fh.truncate(len(whole) // 3)
        failed = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert failed.status_code == 500 and shard.name in failed.json()["error"]["message"]
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and "changed under the server" in health.json()["message"]
        assert shard.name not in health.text  # (no key is asked there: no file names)
        shard.write_bytes(whole)
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert httpx.get(url + "/health").json()["status"] == "ok"  # whole again: before any request proves it
        again = httpx.post(url + "/v1/completions", json=body, timeout=60)
        assert again.status_code == 200 and again.json()["choices"][0]["text"] == want
    finally:
        server.should_exit = True
        thread.join(10)
        engine.close()


def test_chat_streaming_and_not(served):
    url, name, engine = served
    msgs = [{"role": "user", "content": "hello there"}]
    c = client(url)
    r = c.chat.completions.create(model=name, messages=msgs, max_tokens=12, temperature=0)
    want = expected_text(engine, engine.tokenizer.encode_messages(msgs), 12)
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.model_extra["moespeq"]["tokens_per_s"] > 0
    chunks = list(
        c.chat.completions.create(
            model=name, messages=msgs, max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_asked_for_usage_every_chunk_carries_it_null_but_the_last(served):
    """OpenAI's streamed chunks with ``stream_options.include_usage``: "usage" null on each
    but the last (which has it, and no choices); moespeq left the key out."""
    url, name, _engine = served
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", url + "/v1/chat/completions", json=body | {"stream_options": {"include_usage": True}}
    ) as r:
        events = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")]
    assert all("usage" in e and e["usage"] is None for e in events[:-1]) and len(events) > 2
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 4
    with httpx.stream("POST", url + "/v1/chat/completions", json=body) as r:  # not asked: no key
        assert not any("usage" in json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {"))


def test_completions_and_stop(served):
    url, name, engine = served
    c = client(url)
    full = c.completions.create(model=name, prompt="once upon", max_tokens=16, temperature=0).choices[0].text
    assert full == expected_text(engine, engine.tokenizer.encode("once upon"), 16)
    stop = full[3:5]
    r = c.completions.create(model=name, prompt="once upon", max_tokens=16, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"
    streamed = c.completions.create(
        model=name, prompt="once upon", max_tokens=16, temperature=0, stop=stop, stream=True
    )
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == full[: full.find(stop)]


def test_eight_concurrent_clients_get_their_own_answers(served):
    url, name, engine = served
    prompts = [f"prompt number {i}" for i in range(8)]
    want = {p: expected_text(engine, engine.tokenizer.encode(p), 10) for p in prompts}

    def ask(p):
        return p, client(url).completions.create(model=name, prompt=p, max_tokens=10, temperature=0).choices[0].text

    with ThreadPoolExecutor(8) as pool:
        got = dict(pool.map(ask, prompts))
    assert got == want


def test_disconnect_mid_stream_frees_the_server(served):
    url, name, _ = served
    body = {"model": name, "prompt": "a long story", "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    t0 = time.time()
    r = client(url).completions.create(model=name, prompt="next", max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert time.time() - t0 < 30


@pytest.mark.parametrize(
    "payload, status, code",
    [
        ("{not json", 400, "invalid_json"),
        ("[" * 100_000 + "]" * 100_000, 400, "invalid_json"),  # nested past the parser's depth
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": 2}), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": True}), 400, "invalid_value"),
        (json.dumps({"messages": []}), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}), 400, None),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ""}), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stop": ["a", ""]}), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": "gpt-4o"}), 404, "model_not_found"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": 5}), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "model": ["demo"]}), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}), 400, "invalid_value"),
        (json.dumps({"messages": [{"role": "user", "content": "x" * 4000}]}), 400, "context_length_exceeded"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}), 400, None),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream_options": {}}), 400, "invalid_value"),
        # asked for, not done: refused rather than silently answered without it
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "logprobs": True}), 400, "unsupported"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "presence_penalty": 1.5}), 400, "unsupported"),
        (json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}), 400, None),
        (
            json.dumps({"messages": [{"role": "user", "content": "hi"}], "response_format": {"type": "json_object"}}),
            400,
            None,
        ),
    ],
)
def test_bad_requests_get_openai_errors(served, payload, status, code):
    url, _, _ = served
    r = httpx.post(url + "/v1/chat/completions", content=payload, headers={"Content-Type": "application/json"})
    assert r.status_code == status
    err = r.json()["error"]
    assert err["message"] and err["type"]
    if code:
        assert err["code"] == code


def test_completions_requests_name_their_own_fields(served):
    """/v1/completions errors name 'prompt', not chat's 'messages'; a list of several
    prompts or of token ids says what is not supported; echo is refused; neutral values of
    unsupported fields (logprobs false, penalties 0) and top_p 0 are served."""
    url, _, _ = served
    post = lambda body: httpx.post(url + "/v1/completions", json=body)  # noqa: E731
    err = post({"prompt": "x" * 4000}).json()["error"]
    assert err["code"] == "context_length_exceeded" and err["param"] == "prompt"
    err = post({"prompt": ["To be", "Thou art"]}).json()["error"]
    assert "one prompt a request" in err["message"] and err["param"] == "prompt"
    assert "token ids" in post({"prompt": [[1, 2, 3]]}).json()["error"]["message"]
    assert post({"prompt": "hi", "echo": True}).json()["error"]["param"] == "echo"
    ok = post(
        {
            "prompt": "hi",
            "max_tokens": 3,
            "logprobs": None,
            "presence_penalty": 0,
            "top_p": 0,
            "temperature": 1,
            "stream": None,  # null: the default (not streamed), as the other fields' null
        }
    )
    assert ok.status_code == 200, ok.text
    greedy = post({"prompt": "hi", "max_tokens": 3, "temperature": 0}).json()["choices"][0]["text"]
    assert ok.json()["choices"][0]["text"] == greedy  # top_p 0: the most likely token only
    # a temperature below 0.0001 (valid for OpenAI) decodes greedily; n null is n 1
    tiny = post({"prompt": "hi", "max_tokens": 3, "temperature": 1e-5, "seed": 3, "n": None})
    assert tiny.status_code == 200, tiny.text
    assert tiny.json()["choices"][0]["text"] == greedy


def test_an_assistant_turn_may_have_null_content(served):
    """OpenAI's clients send ``"content": null`` for an assistant turn that called tools."""
    url, _, _ = served
    messages = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "again"},
    ]
    r = httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text
    r = httpx.post(url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": None}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"


def test_a_bad_value_is_quoted_as_the_client_sent_it(served):
    url, _, _ = served
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": True}
    err = httpx.post(url + "/v1/chat/completions", json=body).json()["error"]
    assert err["message"] == "'max_tokens' must be an integer from 1 to 2147483647, got true", err


def test_api_key_is_checked(tiny):
    path, _ = tiny("mixtral", "gqa")
    server, thread, url, name, _ = start(path, api_key="sekret")
    try:
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.retrieve(name)
        assert client(url, "sekret").models.list().data[0].id == name
        assert httpx.get(url + "/health").status_code == 200  # health needs no key
        # the scheme is case-insensitive, the key is not
        assert httpx.get(url + "/v1/models", headers={"Authorization": "bearer sekret"}).status_code == 200
        assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer SEKRET"}).status_code == 401
        assert httpx.get(url + "/v1/models", headers={"Authorization": "sekret"}).status_code == 401
        # a route that does not exist is not told to a client without the key
        assert httpx.get(url + "/v1/nope").status_code == 401
        assert httpx.get(url + "/v1/nope", headers={"Authorization": "Bearer sekret"}).status_code == 404
    finally:
        server.should_exit = True
        thread.join(10)


def test_full_queue_answers_503():
    from moespeq_cli.server import ApiError, Job, Worker

    w = Worker(SlowEngine(0.5), queue_size=1)
    jobs = [Job([1], 1, None, []) for _ in range(3)]
    w.submit(jobs[0])
    time.sleep(0.1)  # the worker took the first; one may wait
    w.submit(jobs[1])
    with pytest.raises(ApiError) as e:
        w.submit(jobs[2])
    assert e.value.status == 503
    w.stop()


def test_unknown_routes_get_openai_errors(served):
    url, _, _ = served
    r = httpx.get(url + "/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["type"]


def test_stop_drops_waiting_jobs_and_joins():
    from moespeq_cli.server import Job, Worker

    w = Worker(SlowEngine(0.3), queue_size=4)
    jobs = [Job([1], 1, None, []) for _ in range(3)]
    for j in jobs:
        w.submit(j)
    time.sleep(0.05)
    t0 = time.time()
    w.stop()
    assert not w.thread.is_alive() and time.time() - t0 < 5
    assert all(j.done.is_set() for j in jobs) and jobs[-1].error.code == "shutting_down"


def test_ctrl_c_cuts_the_answer_in_progress_and_drops_the_queue():
    """uvicorn waits for open connections before it shuts down: its Ctrl-C handler must
    first halt the worker, or a long answer keeps the server up until it ends."""
    import signal
    from types import SimpleNamespace

    import uvicorn

    from moespeq_cli.server import ApiError, HaltingServer, Job, Worker

    w = Worker(EndlessEngine(), queue_size=4)
    running, waiting = Job([1], 10**6, None, []), Job([1], 5, None, [])
    w.submit(running)
    w.submit(waiting)
    deadline = time.time() + 30
    while not running.answer.token_ids:  # generating
        assert time.time() < deadline, "the worker never started the first answer"
        time.sleep(0.01)
    app = SimpleNamespace(state=SimpleNamespace(worker=w))
    server = HaltingServer(uvicorn.Config(app, log_config=None))
    server.handle_exit(signal.SIGINT, None)  # only flags: a signal handler must not take the queue's lock
    assert server.should_exit
    assert running.done.wait(5), "the answer in progress was not cut"
    assert len(running.answer.token_ids) < 10**6 and not running.cancelled
    assert isinstance(running.error, ApiError) and running.error.status == 503 and "cut short" in running.error.message
    # the queued request is answered 503 (its client is still there), not taken for one gone
    assert waiting.done.wait(5) and not waiting.cancelled and not waiting.answer.token_ids
    assert isinstance(waiting.error, ApiError) and waiting.error.code == "shutting_down"
    with pytest.raises(ApiError, match="shutting down"):
        w.submit(Job([1], 1, None, []))
    w.stop()
    assert not w.thread.is_alive()


def test_an_answer_that_ended_is_not_called_cut():
    """Ctrl-C as the last token comes: the answer is whole (length), no 503."""
    from types import SimpleNamespace

    from moespeq_cli.server import Job, Worker

    class HaltsAtTheLastToken(EndlessEngine):
        def generate(self, prompt_ids, n, *a, **kw):
            for i in range(n):
                if i == n - 1:
                    w.halt()
                yield SimpleNamespace(token=1, eos=False)

    w = Worker(HaltsAtTheLastToken(), queue_size=1)
    job = Job([1], 3, None, [])
    w.submit(job)
    assert job.done.wait(5)
    assert len(job.answer.token_ids) == 3 and job.error is None and job.answer.finish_reason == "length"
    w.stop()


def test_a_busy_port_is_one_line_before_loading(cli):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = cli("serve", "--port", str(port))
    # the machine's state, not a bad command line: a runtime failure
    assert r.exit_code == 1 and "pick another --port" in r.stderr and "Traceback" not in r.stderr


def test_serve_says_the_port_it_got_and_stops_cleanly_on_ctrl_c(tiny):
    """With --port 0 the line says the port the system gave (and the server answers there,
    from the moment the line is said);
    Ctrl-C, the documented way to stop, exits 0 with "stopped", not an error. A --max-tokens
    beyond the context is said at start; --served-model-name is the model's id."""
    import re
    import signal
    import subprocess
    import sys

    path, _ = tiny("mixtral", "gqa")
    cmd = [sys.executable, "-m", "moespeq_cli", "serve", str(path), "--backend", "cpu", "--port", "0"]
    p = subprocess.Popen(
        [*cmd, "--max-tokens", "100000", "--served-model-name", "tiny"], stderr=subprocess.PIPE, text=True
    )
    try:
        line, before = "", ""
        while "serving" not in line:
            before += line
            line = p.stderr.readline()
            assert line, "serve exited before serving"
        assert "--max-tokens 100000 is not less than the context" in before and "--api-key" not in before
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)/v1", line).group(1))
        assert port != 0
        import socket

        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # listening once it says so (was 50 ms later)
        assert httpx.get(f"http://127.0.0.1:{port}/health").json() == {"status": "ok", "model": "tiny"}
        assert "serving tiny on" in line
        p.send_signal(signal.SIGINT)
        rest = p.stderr.read()
        assert p.wait(30) == 0 and "stopped" in rest and "error" not in rest and "Traceback" not in rest
    finally:
        if p.poll() is None:
            p.kill()
    p = subprocess.Popen([*cmd, "--host", "0.0.0.0"], stderr=subprocess.PIPE, text=True)
    try:  # every interface and no key: said (as llama-server and ollama allow it)
        before = ""
        while "serving" not in (line := p.stderr.readline()):
            assert line, "serve exited before serving"
            before += line
        assert "--host 0.0.0.0 without --api-key: anyone who can reach this machine" in before
        p.send_signal(signal.SIGINT)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_a_host_that_is_not_this_machines_is_a_usage_error(cli):
    r = cli("serve", "--host", "192.0.2.1", "--port", "0")  # TEST-NET-1: never a local address
    assert r.exit_code == 2 and "cannot listen on 192.0.2.1" in r.stderr and "Traceback" not in r.stderr
    for bad in ("", " ", "a\nb"):
        r = cli("serve", "--served-model-name", bad, "--port", "0")
        assert r.exit_code == 2 and "--served-model-name must be" in r.stderr, r.stderr


def test_a_conversation_reuses_its_earlier_turns(served):
    url, name, _ = served
    c = client(url)
    first = [{"role": "user", "content": "tell me about the sea"}]
    a = c.chat.completions.create(model=name, messages=first, max_tokens=8, temperature=0)
    more = first + [{"role": "assistant", "content": a.choices[0].message.content}, {"role": "user", "content": "and?"}]
    b = c.chat.completions.create(model=name, messages=more, max_tokens=8, temperature=0)
    assert b.model_extra["moespeq"]["prompt_tokens_reused"] > 0


def test_the_log_names_ignored_fields_and_a_cancelled_answer(served, capsys, monkeypatch):
    """Fields the API neither reads nor refuses are ignored (as OpenAI-compatible servers do
    with vendor extensions) and named in the request's log line; a non-streaming request
    whose client left is logged 499, as a streaming one is (it was "200 · cancelled")."""
    url, name, _ = served
    body = {"model": name, "prompt": "hi", "max_tokens": 2, "frobnicate": 1, "prompt_cache_key": "k", "x\n\x1b[2J": 0}
    assert httpx.post(url + "/v1/completions", json=body, timeout=60).status_code == 200
    line = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("POST /v1/completions"))
    assert (
        line.startswith("POST /v1/completions 200") and "ignored: frobnicate, prompt_cache_key, 'x\\n\\x1b[2J'" in line
    ), line
    engine = served[2]
    fast = engine.generate

    def slow(*a, **kw):  # 50 ms a token: the client leaves long before the answer ends
        for ev in fast(*a, **kw):
            time.sleep(0.05)
            yield ev

    monkeypatch.setattr(engine, "generate", slow)
    long = {"model": name, "prompt": "a long story", "max_tokens": 100, "temperature": 0}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(url + "/v1/completions", json=long, timeout=0.3)
    seen = ""
    deadline = time.time() + 30
    while "POST /v1/completions 499" not in seen and time.time() < deadline:
        time.sleep(0.1)
        seen += capsys.readouterr().err
    assert "POST /v1/completions 499" in seen and "cancelled: the client went away" in seen, seen


def test_ctrl_c_ends_a_streamed_answer_with_an_error_event_then_done(tiny, monkeypatch):
    """Over HTTP: Ctrl-C while an answer streams ends the stream at once with an error
    event (503, the answer cut short) and `data: [DONE]`, and the server stops; uvicorn
    alone would wait for the answer to end."""
    import signal

    from moespeq_cli.server import HaltingServer

    path, _ = tiny("mixtral", "gqa")
    server, thread, url, name, engine = start(path, queue=4, server_class=HaltingServer)
    fast = engine.generate

    def slow(*a, **kw):  # 50 ms a token: 200 tokens would take 10 s
        for ev in fast(*a, **kw):
            time.sleep(0.05)
            yield ev

    monkeypatch.setattr(engine, "generate", slow)
    body = {"model": name, "prompt": "once upon", "max_tokens": 200, "temperature": 0, "stream": True, "seed": 1}
    events = []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == 2:  # answering: stop the server as Ctrl-C does
                    server.handle_exit(signal.SIGINT, None)
    thread.join(30)
    assert not thread.is_alive()
    assert events[-1] == "[DONE]" and len(events) < 100  # cut, not the 200 tokens asked
    error = json.loads(events[-2])["error"]
    assert error["code"] == "shutting_down" and "cut short" in error["message"]
    assert all("choices" in json.loads(e) for e in events[:-2])
    engine.close()


def test_a_stream_still_queued_at_shutdown_gets_a_real_503(tiny, monkeypatch, capsys):
    """A streamed request's headers go out when its generation starts: one still waiting
    in the queue when the server stops is answered HTTP 503 `shutting_down` (it got 200
    and the error as an event), and the log says the stream under way ended by an error
    event under its 200 (it logged 503, which no client saw)."""
    import signal

    from moespeq_cli.server import HaltingServer

    path, _ = tiny("mixtral", "gqa")
    server, thread, url, name, engine = start(path, queue=4, server_class=HaltingServer)
    fast = engine.generate

    def slow(*a, **kw):
        for ev in fast(*a, **kw):
            time.sleep(0.05)
            yield ev

    monkeypatch.setattr(engine, "generate", slow)
    body = {"model": name, "prompt": "once upon", "max_tokens": 200, "temperature": 0, "stream": True}
    queued = {}

    def second():
        with httpx.stream("POST", url + "/v1/completions", json=body | {"prompt": "later"}, timeout=30) as r:
            queued["status"] = r.status_code
            queued["body"] = r.read().decode()

    other = threading.Thread(target=second)
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
        for n, _line in enumerate(r.iter_lines()):
            if n == 2:  # answering: queue a second stream behind it, then stop as Ctrl-C does
                other.start()
                time.sleep(0.5)
                server.handle_exit(signal.SIGINT, None)
    other.join(30)
    thread.join(30)
    assert queued["status"] == 503, queued
    assert json.loads(queued["body"])["error"]["code"] == "shutting_down"
    log = capsys.readouterr().err
    assert "POST /v1/completions 200" in log and "ended by an error event" in log, log
    engine.close()


def partial_upload(port: int):
    """A socket that sent a request's headers and 6 of its body's 100 bytes, then stalls."""
    import socket

    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
    s.sendall((head + "Content-Length: 100\r\n\r\n").encode() + b'{"mess')
    return s


def test_a_stalled_upload_does_not_hold_the_shutdown(tiny):
    """A client that stops partway through its request's body held Ctrl-C and SIGTERM as
    long as it stalled (a QA run: 102 s, until the client gave up; a second Ctrl-C then
    printed a traceback): it is answered 503 and the server stops."""
    import signal

    from moespeq_cli.server import HaltingServer

    path, _ = tiny("mixtral", "gqa")
    server, thread, url, name, engine = start(path, server_class=HaltingServer)
    with partial_upload(int(url.rsplit(":", 1)[1])) as s:
        time.sleep(0.5)  # the handler waits for the rest of the body
        server.handle_exit(signal.SIGTERM, None)
        thread.join(10)
        assert not thread.is_alive()
        reply = s.recv(65536).decode()
    assert reply.startswith("HTTP/1.1 503") and "shutting_down" in reply, reply
    engine.close()


def test_a_client_that_leaves_mid_upload_is_logged_as_gone(served, capsys):
    """It was logged '400 cannot encode the request's text with this model's tokenizer'."""
    url, _name, _engine = served
    with partial_upload(int(url.rsplit(":", 1)[1])):
        time.sleep(0.3)
    seen, deadline = "", time.time() + 20
    while "POST /v1/chat/completions 499" not in seen and time.time() < deadline:
        time.sleep(0.1)
        seen += capsys.readouterr().err
    assert "POST /v1/chat/completions 499" in seen and "went away while sending the request" in seen, seen
    assert "tokenizer" not in seen, seen


def test_context_errors_read_as_sentences():
    """'the prompt (1 token) plus max_tokens ...' (was '1 tokens'); a prompt that fills the
    context 'leaves no room for an answer' (was 'takes 513 tokens, the whole context')."""
    from moespeq_cli.server import ApiError
    from moespeq_cli.server.requests import parse_options

    with pytest.raises(ApiError, match=r"the prompt \(1 token\) plus max_tokens 600 exceeds"):
        parse_options({"max_tokens": 600}, 1, 512, 64)
    with pytest.raises(ApiError, match=r"the prompt \(513 tokens\) leaves no room for an answer"):
        parse_options({}, 513, 512, 64)


@pytest.fixture(scope="module")
def templated(tiny, tmp_path_factory):
    """The tiny Mixtral with a template that shows what it was given: names, and the
    variables a request may pass (chat_template_kwargs, reasoning_effort)."""
    import shutil

    src, _ = tiny("mixtral", "gqa")
    dst = tmp_path_factory.mktemp("templated") / "ckpt"
    shutil.copytree(src, dst)
    template = (
        "{% if messages[-1]['content'] == 'boom' %}{{ raise_exception('no boom here') }}{% endif %}"
        "{% if messages[-1]['content'] == 'undefined' %}{{ nothing_here.attr }}{% endif %}"
        "{% if messages[-1]['content'] == 'nothing' %}{% else %}"
        "{% for m in messages %}<|{{ m['role'] }}{% if m['name'] %}:{{ m['name'] }}{% endif %}|>{{ m['content'] }}\n"
        "{% endfor %}{% if enable_thinking is defined %}[think {{ enable_thinking }}]{% endif %}"
        "{% if reasoning_effort is defined %}[effort {{ reasoning_effort }}]{% endif %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}{% endif %}"
    )
    (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    server, thread, url, name, engine = start(dst)
    yield url, engine
    server.should_exit = True
    thread.join(10)


def test_a_chat_request_reaches_the_template_whole_or_is_refused(templated):
    """Names, chat_template_kwargs and reasoning_effort reach the template (as vLLM passes
    them); parts are joined by a newline; tool calls, tool results and fields asking for
    what moespeq does not do are refused with the field named; the template's own refusal
    and an empty rendering are 400s that say so, never 500 or a crash."""
    url, engine = templated
    tok = engine.tokenizer

    def post(messages, **extra):
        return httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1, **extra})

    def prompt_tokens(messages, **extra):
        r = post(messages, **extra)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    hi = [{"role": "user", "content": "hi"}]
    assert prompt_tokens(hi) == len(tok._encode("<|user|>hi\n<|assistant|>", False))
    named = [{"role": "user", "content": "hi", "name": "ann"}]
    assert prompt_tokens(named) == len(tok._encode("<|user:ann|>hi\n<|assistant|>", False))
    think = prompt_tokens(hi, chat_template_kwargs={"enable_thinking": False}, reasoning_effort="low")
    assert think == len(tok._encode("<|user|>hi\n[think False][effort low]<|assistant|>", False))
    parts = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert prompt_tokens(parts) == len(tok._encode("<|user|>a\nb\n<|assistant|>", False))
    assert prompt_tokens(hi, tool_choice="none", parallel_tool_calls=True, modalities=["text"]) > 0
    assert prompt_tokens(hi, modalities=[], chat_template_kwargs={"template": 1, "where": 2}) > 0  # names of ours
    tool = post([*hi, {"role": "tool", "tool_call_id": "c1", "content": "42"}]).json()["error"]
    assert tool["param"] == "messages"
    broken = post([{"role": "user", "content": "undefined"}])  # the template's own bug: the server's fault
    assert broken.status_code == 500 and broken.json()["error"]["type"] == "server_error", broken.text
    assert "is undefined" in broken.text and "tokenizer_config.json" not in broken.text  # no server path
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    refused = [
        (post([*hi, {"role": "assistant", "content": None, "tool_calls": [call]}]), "tool_calls"),
        (post([*hi, {"role": "tool", "tool_call_id": "c1", "content": "42"}]), "tool result"),
        (post(hi, tool_choice="required"), "tool_choice"),
        (post(hi, function_call={"name": "f"}), "function_call"),
        (post(hi, modalities=["text", "audio"]), "modalities"),
        (post(hi, audio={"voice": "x"}), "audio"),
        (post(hi, prediction={"type": "content", "content": "x"}), "prediction"),
        (post(hi, chat_template_kwargs={"messages": []}), "may not set messages"),
        (post(hi, reasoning_effort="extreme"), "reasoning_effort"),
        (post([{"role": "user", "content": "boom"}]), "no boom here"),
        (post([{"role": "user", "content": "nothing"}]), "renders these messages as an empty prompt"),
        (post(hi, chat_template_kwargs={"raise_exception": 1}), "may not set raise_exception"),
        (httpx.post(url + "/v1/completions", json={"prompt": "hi", "reasoning_effort": "low"}), "/v1/chat/completions"),
    ]
    for r, needle in refused:
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
        assert "--no-chat" not in r.text and "tokenizer_config.json" not in r.text


def test_serve_refuses_a_template_no_request_can_render(tiny, tmp_path):
    import shutil

    src, _ = tiny("mixtral", "gqa")
    dst = tmp_path / "bad"
    shutil.copytree(src, dst)
    (dst / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ messages | frobnicate }}"}))
    import subprocess
    import sys

    args = [sys.executable, "-m", "moespeq_cli", "serve", str(dst), "--backend", "cpu", "--port", "0"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=120)  # a server that started would not end
    assert r.returncode == 1 and "does not compile" in r.stderr and "frobnicate" in r.stderr, r.stderr
    assert "fix it" in r.stderr and "--no-chat" not in r.stderr


def test_a_final_assistant_message_may_be_continued(templated):
    """vLLM's continue_final_message: the prompt ends inside the assistant's message (the
    template's end of turn cut), not with a new turn; add_generation_prompt false ends
    after the last message; the two together, a final user message or an empty one are
    400s."""
    url, engine = templated
    tok = engine.tokenizer

    def post(messages, **extra):
        return httpx.post(url + "/v1/chat/completions", json={"messages": messages, "max_tokens": 1, **extra})

    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  Sure: {"}]
    r = post(talk, continue_final_message=True, add_generation_prompt=False)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tok._encode("<|user|>hi\n<|assistant|>  Sure: {", False))
    assert r.json()["choices"][0]["message"]["refusal"] is None  # (OpenAI's field, required though null)
    assert tok.render_messages(talk, continue_final=True).endswith("Sure: {")
    plain = post(talk, add_generation_prompt=False).json()["usage"]["prompt_tokens"]
    assert plain == len(tok._encode("<|user|>hi\n<|assistant|>  Sure: {\n", False))
    for messages, extra, needle in [
        (talk, {"continue_final_message": True, "add_generation_prompt": True}, "cannot both be true"),
        (talk[:1], {"continue_final_message": True}, "the last message is the user's"),
        ([*talk[:1], {"role": "assistant", "content": " "}], {"continue_final_message": True}, "is empty"),
        (talk, {"continue_final_message": "yes"}, "must be true or false"),
    ]:
        r = post(messages, **extra)
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_a_model_without_a_template_continues_the_last_line(tiny):
    from moespeq_cli.models.checkpoint import Checkpoint
    from moespeq_cli.tokenizer import Tokenizer

    path, _ = tiny("mixtral", "gqa")
    tok = Tokenizer(path, Checkpoint(path).raw_config)
    talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "well\n"}]
    assert tok.encode_messages(talk) == tok.encode("hi\nwell\n")
    assert tok.encode_messages(talk, continue_final=True) == tok.encode("hi\nwell")
    # a short prefill is not looked for in the template's markup (a search for it found the
    # `<` of `<|im_end|>`, or "im" in it): the prompt is the template's up to the message
    tok.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    for prefill in ("<", ">", "im", " {"):
        talk = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": prefill}]
        rendered = tok.render_messages(talk, continue_final=True)
        assert rendered == f"<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n{prefill}", rendered


def test_what_changes_the_answer_is_honoured_or_refused(served):
    """top_k (vLLM's, llama.cpp's) is honoured: top_k 1 is greedy at any temperature. The
    extensions that would change the answer are refused at other than their defaults
    (they were ignored, named only in the log); at their defaults, as front ends send
    them, they pass. A field of the other endpoint is refused, not dropped."""
    url, name, engine = served
    msgs = [{"role": "user", "content": "hello there"}]

    def post(path="/v1/chat/completions", **extra):
        body = {"messages": msgs, "max_tokens": 8} if path.endswith("chat/completions") else {"max_tokens": 8}
        return httpx.post(url + path, json=body | extra, timeout=60)

    greedy = expected_text(engine, engine.tokenizer.encode_messages(msgs), 8)
    r = post(temperature=1.5, top_k=1, seed=3)
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == greedy, r.text
    defaults = dict(repetition_penalty=1.0, min_p=0, typical_p=1, ignore_eos=False, grammar="", guided_json=None)
    assert post(**defaults, top_k=-1, stop_token_ids=[], skip_special_tokens=True).status_code == 200
    for field, value in [
        ("repetition_penalty", 1.1),
        ("repeat_penalty", 1.1),
        ("repetition_penalty", True),
        ("truncate_prompt_tokens", 2),
        ("dry_multiplier", 0.8),
        ("min_p", ""),
        ("min_p", 0.05),
        ("guided_json", {"type": "object"}),
        ("grammar", 'root ::= "a"'),
        ("json_schema", {}),
        ("ignore_eos", True),
        ("n_predict", 2),
        ("stop_token_ids", [2]),
        ("top_k", 1.5),
        ("n", 1.0),
    ]:
        r = post(**{field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, r.text)
    for path, extra, field in [
        ("/v1/chat/completions", {"prompt": "hi"}, "prompt"),
        ("/v1/completions", {"prompt": "hi", "messages": msgs}, "messages"),
        ("/v1/completions", {"prompt": "hi", "continue_final_message": True}, "continue_final_message"),
        ("/v1/completions", {"prompt": "hi", "logprobs": 0}, "logprobs"),  # (there, 0 asks for the chosen token's)
    ]:
        r = post(path, **extra)
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (path, field, r.text)
    assert post("/v1/completions", prompt="hi", logprobs=None).status_code == 200


def test_text_that_is_not_unicode_is_the_requests_fault(served):
    """A lone surrogate ("\\ud800", valid JSON) was reported as a broken tokenizer, with the
    server's path to it: a 400 naming the field now."""
    url, _, _ = served
    for path, body, field in [
        ("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}', "prompt"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "\\udfff"}]}', "messages"),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "hi"}], "stop": ["\\ud800"]}', "stop"),
    ]:
        r = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"})
        err = r.json()["error"]
        assert r.status_code == 400 and err["param"] == field and "not valid Unicode" in err["message"], r.text
        assert "tokenizer" not in err["message"] and "/" not in err["message"].replace("\\ud800-\\udfff", "")


def test_a_web_page_cannot_drive_the_server(served):
    """A body not sent as JSON (a page's form or text/plain needs no CORS preflight) is a
    415 before it is read; a Host that is not a loopback name (DNS rebinding) is a 403;
    localhost, 127.0.0.1 and [::1] with any port are this machine."""
    url, name, _ = served
    body = json.dumps({"prompt": "hi", "max_tokens": 1})
    for ctype in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None):
        headers = {"Content-Type": ctype} if ctype else {}
        r = httpx.post(url + "/v1/completions", content=body, headers=headers)
        assert r.status_code == 415 and "Content-Type: application/json" in r.json()["error"]["message"], ctype
    for ctype in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"):
        assert httpx.post(url + "/v1/completions", content=body, headers={"Content-Type": ctype}).status_code == 200
    port = url.rsplit(":", 1)[1]
    for host in ("attacker.test", f"attacker.test:{port}", "127.0.0.1.nip.io", "10.0.0.1"):
        r = httpx.get(url + "/v1/models", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", host
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "app.localhost", "127.0.0.2", "127.1"):
        assert httpx.get(url + "/v1/models", headers={"Host": host}).status_code == 200, host
    r = httpx.options(url + "/v1/chat/completions", headers={"Origin": "https://evil.example"})
    assert "access-control-allow-origin" not in r.headers  # no CORS: a page of another origin reads nothing


def test_the_host_check_follows_the_bound_address():
    """Whether to check is read from the socket's address, not the --host text (`--host
    ip6-localhost` or the machine's own name bind loopback, and were not checked); the
    name given is allowed; a server bound elsewhere is not checked."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from moespeq_cli.server.access import Gate

    def app(bind, address):
        routes = [Route("/x", lambda request: PlainTextResponse("ok"))]
        return Gate(Starlette(routes=routes), bind, lambda *a: None, address)

    named = TestClient(app("mybox", "127.0.1.1"), base_url="http://mybox:8000")
    assert named.get("/x").status_code == 200
    assert named.get("/x", headers={"Host": "attacker.test"}).status_code == 403
    v6 = TestClient(app("ip6-localhost", "::1"), base_url="http://attacker.test")
    assert v6.get("/x").status_code == 403
    public = TestClient(app("0.0.0.0", "0.0.0.0"), base_url="http://anything.example")
    assert public.get("/x").status_code == 200


def test_paths_with_a_trailing_slash_and_http_headers(served):
    """A trailing slash is the same path (it was a 307 to a URL built from Host, or 404
    for a model id); a 405 says which methods are allowed."""
    url, name, _ = served
    assert httpx.get(url + "/health/").json()["status"] == "ok"
    assert httpx.get(url + f"/v1/models/{name}/").json()["id"] == name
    r = httpx.post(url + "/v1/completions/", json={"prompt": "hi", "max_tokens": 1})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] is not None
    r = httpx.get(url + "/v1/chat/completions")
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_a_401_names_its_scheme(tiny):
    path, _ = tiny("mixtral", "gqa")
    server, thread, url, name, _ = start(path, api_key="k")
    try:
        r = httpx.get(url + "/v1/models")
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    finally:
        server.should_exit = True
        thread.join(10)


def test_a_second_ctrl_c_stops_serve_without_a_traceback():
    """Ctrl-C twice while an answer streams: uvicorn then skipped the app's shutdown, its
    task was cancelled as the loop closed and uvicorn logged a 40-line traceback. Exit 0,
    "stopped", the streamed answer ended by its error event."""
    import re
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "moespeq_cli", "serve", "demo", "--port", "0"]  # (slow enough to stop mid-answer)
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "serving" not in line:
            line = p.stderr.readline()
            assert line, "serve exited before serving"
        url = re.search(r"(http://\S+)/v1", line).group(1)
        body = {"prompt": "a long story", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=30) as r:
            lines = r.iter_lines()
            assert next(ln for ln in lines if ln.startswith("data: "))  # streaming
            p.send_signal(signal.SIGINT)
            time.sleep(0.1)
            p.send_signal(signal.SIGINT)
            rest = "\n".join(lines)
        err = p.stderr.read()
        assert p.wait(30) == 0 and "stopped" in err and "Traceback" not in err, err
        assert "shutting_down" in rest or "[DONE]" in rest
    finally:
        if p.poll() is None:
            p.kill()
