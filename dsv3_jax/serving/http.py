r"""An OpenAI-style completions endpoint over the serving engine, standard library only.

  GET  /v1/models        the served model
  POST /v1/completions   {"prompt": str, "max_tokens": 16, "temperature": 1.0, "top_p": 1.0,
                          "stream": false, ...}
  GET  /health           200 "ok"

A non-streaming reply is one JSON object ({"id", "object": "text_completion", "created",
"model", "choices": [{"index": 0, "text", "finish_reason": "stop" | "length"}], "usage"});
a streaming reply is server-sent events, `data: {chunk}\n\n` with the text deltas in
`choices[0].text` (the finish reason on the last chunk), then `data: [DONE]\n\n`. A bad request
gets HTTP 400 with {"error": {"message", "type": "invalid_request_error", "param", "code"}}.

Text goes to tokens with the model's tokenizer (the byte tokenizer by default) and back with
incremental detokenisation: a delta that ends inside a multi-byte character is held back until
the character completes. Each HTTP request runs on its own thread (`ThreadingHTTPServer`) and
waits on its request's `TokenStream`; the engine thread batches them all (continuous batching,
DeepSeek-V3 report arXiv 2412.19437 §3.4). A client that disconnects mid-stream cancels its
request and frees the slot.

Extensions beyond OpenAI's fields (as vLLM names them): `top_k`, `ignore_eos`.
"""

import json
import logging
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional

from dsv3_jax.serving.requests import Request, RequestError, StreamError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
STREAM_TIMEOUT_S = 600.0  # longest wait for one token before the reply is abandoned

# field -> (accepted types, default); bool is not a number here.
_FIELDS = {
  "prompt": ((str,), None),
  "max_tokens": ((int,), 16),
  "temperature": ((int, float), 1.0),
  "top_p": ((int, float), 1.0),
  "top_k": ((int,), 0),
  "stream": ((bool,), False),
  "seed": ((int,), None),
  "ignore_eos": ((bool,), False),
  "model": ((str,), None),
  "n": ((int,), 1),
  "user": ((str,), None),
  "stream_options": ((dict,), None),
}
# OpenAI fields this server does not implement: accepted only when null or at their default.
_UNSUPPORTED = {
  "stop": None,
  "echo": False,
  "logprobs": None,
  "best_of": 1,
  "suffix": None,
  "logit_bias": None,
  "presence_penalty": 0,
  "frequency_penalty": 0,
}


def _type_name(types) -> str:
  names = {
    int: "an integer",
    float: "a number",
    str: "a string",
    bool: "a boolean",
    dict: "an object",
  }
  return " or ".join(names[t] for t in types if not (t is int and float in types))


def parse_completion(body: dict, tokenizer, served_name: str) -> tuple[Request, dict]:
  """(engine Request, options {"stream", "include_usage"}) of a /v1/completions body.

  Raises RequestError naming the field; the engine's own checks (context length, token ids)
  run at submit.
  """
  if not isinstance(body, dict):
    raise RequestError("the request body must be a JSON object")
  for key, value in body.items():
    if key in _UNSUPPORTED:
      if value is not None and value != _UNSUPPORTED[key]:
        raise RequestError(f"{key} is not supported by this server", key)
      continue
    if key not in _FIELDS:
      raise RequestError(f"unknown field {key!r}; supported: {', '.join(sorted(_FIELDS))}", key)
    types, _ = _FIELDS[key]
    if value is None and key not in ("prompt",):
      continue
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
      raise RequestError(f"{key} must be {_type_name(types)}, got {json.dumps(value)}", key)
  get = lambda k: body.get(k) if body.get(k) is not None else _FIELDS[k][1]
  if "prompt" not in body:
    raise RequestError("prompt is required", "prompt")
  if not body["prompt"]:
    raise RequestError("prompt is empty: give at least one character", "prompt")
  if get("model") is not None and get("model") != served_name:
    raise RequestError(
      f"model {get('model')!r} is not served here; this server serves {served_name!r}", "model"
    )
  if get("n") != 1:
    raise RequestError("n must be 1 (one completion per request)", "n")
  stream_options = get("stream_options") or {}
  if set(stream_options) - {"include_usage"}:
    raise RequestError("stream_options supports only include_usage", "stream_options")
  include_usage = stream_options.get("include_usage", False)
  if not isinstance(include_usage, bool):
    raise RequestError("stream_options.include_usage must be a boolean", "stream_options")
  if stream_options and not get("stream"):
    raise RequestError("stream_options needs stream=true", "stream_options")
  prompt_ids = tokenizer.encode(body["prompt"])
  if not prompt_ids:
    raise RequestError("prompt encodes to no token", "prompt")
  request = Request(
    prompt=prompt_ids,
    max_tokens=get("max_tokens"),
    temperature=float(get("temperature")),
    top_k=get("top_k"),
    top_p=float(get("top_p")),
    seed=get("seed"),
    ignore_eos=get("ignore_eos"),
  )
  return request, {"stream": get("stream"), "include_usage": include_usage}


class Detokenizer:
  """Text deltas of a growing token list; holds back a trailing incomplete character."""

  def __init__(self, tokenizer):
    self.tokenizer = tokenizer
    self.tokens: list = []
    self.sent = ""

  def add(self, token: int) -> str:
    self.tokens.append(token)
    text = self.tokenizer.decode(self.tokens)
    stable = text.rstrip("\ufffd")
    if not stable.startswith(self.sent):  # the decoder revised earlier text: send nothing
      return ""
    delta, self.sent = stable[len(self.sent) :], stable
    return delta

  def flush(self) -> str:
    text = self.tokenizer.decode(self.tokens)
    delta = text[len(self.sent) :] if text.startswith(self.sent) else ""
    self.sent = text
    return delta


class CompletionServer(ThreadingHTTPServer):
  """`ThreadingHTTPServer` holding the engine, tokenizer and served name for its handlers."""

  daemon_threads = True
  allow_reuse_address = True
  request_queue_size = 256  # listen backlog: socketserver's 5 resets bursts of clients

  def __init__(self, address, engine, tokenizer, model_name: str):
    self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
    self.created = int(time.time())
    super().__init__(address, _Handler)

  @property
  def url(self) -> str:
    host, port = self.server_address[:2]
    return f"http://{host}:{port}"


class _ClientGone(Exception):
  pass


class _Handler(BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  server: CompletionServer

  def log_message(self, fmt, *args):  # the access log goes to logging, not stderr
    log.debug("%s %s", self.address_string(), fmt % args)

  # ------------------------------------------------------------------ plumbing
  def _send_json(self, status: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    self.send_response(status)
    self.send_header("Content-Type", "application/json")
    self.send_header("Content-Length", str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _error(
    self,
    status: int,
    message: str,
    param: Optional[str] = None,
    kind: str = "invalid_request_error",
    code: Optional[str] = None,
  ) -> None:
    self._send_json(
      status, {"error": {"message": message, "type": kind, "param": param, "code": code}}
    )

  def _chunk(self, text: str) -> None:
    data = text.encode()
    try:
      self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
      self.wfile.flush()
    except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError) as e:
      raise _ClientGone() from e

  def _event(self, obj) -> None:
    self._chunk("data: " + (obj if isinstance(obj, str) else json.dumps(obj)) + "\n\n")

  # ------------------------------------------------------------------ routes
  def do_GET(self):
    if self.path == "/v1/models":
      srv = self.server
      self._send_json(
        200,
        {
          "object": "list",
          "data": [
            {
              "id": srv.model_name,
              "object": "model",
              "created": srv.created,
              "owned_by": "dsv3_jax",
              "max_model_len": srv.engine.max_len,
            }
          ],
        },
      )
    elif self.path == "/health":
      data = b"ok"
      self.send_response(200)
      self.send_header("Content-Type", "text/plain")
      self.send_header("Content-Length", str(len(data)))
      self.end_headers()
      self.wfile.write(data)
    else:
      self._error(404, f"no route GET {self.path}", kind="not_found_error")

  def do_POST(self):
    if self.path != "/v1/completions":
      self._drain_body()
      self._error(404, f"no route POST {self.path}", kind="not_found_error")
      return
    body = self._read_json()
    if body is None:
      return
    srv = self.server
    try:
      request, options = parse_completion(body, srv.tokenizer, srv.model_name)
      stream = srv.engine.submit(request)
    except RequestError as e:
      self._error(400, str(e), e.param)
      return
    except RuntimeError as e:  # the engine is stopped
      self._error(503, str(e), kind="server_error")
      return
    if options["stream"]:
      self._stream(stream, options["include_usage"])
    else:
      self._complete(stream)

  def _drain_body(self) -> None:
    try:
      n = int(self.headers.get("Content-Length") or 0)
    except ValueError:
      n = 0
    if 0 < n <= MAX_BODY_BYTES:
      self.rfile.read(n)

  def _read_json(self):
    length = self.headers.get("Content-Length")
    if length is None:
      self._error(411, "Content-Length is required")
      self.close_connection = True
      return None
    try:
      n = int(length)
    except ValueError:
      self._error(400, f"bad Content-Length {length!r}")
      self.close_connection = True
      return None
    if n > MAX_BODY_BYTES:
      self._error(413, f"request body of {n} bytes exceeds {MAX_BODY_BYTES}")
      self.close_connection = True
      return None
    raw = self.rfile.read(n)
    try:
      return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      self._error(400, f"the body is not valid JSON: {e}")
      return None

  def _header(self) -> dict:
    return {
      "id": f"cmpl-{uuid.uuid4().hex}",
      "object": "text_completion",
      "created": int(time.time()),
      "model": self.server.model_name,
    }

  def _usage(self, stream) -> dict:
    p, c = len(stream.request.prompt), len(stream.tokens)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

  def _complete(self, stream) -> None:
    try:
      tokens = stream.result(timeout=STREAM_TIMEOUT_S)
    except (StreamError, TimeoutError) as e:
      self._error(500, str(e), kind="server_error")
      return
    text = self.server.tokenizer.decode(tokens)
    self._send_json(
      200,
      dict(
        self._header(),
        choices=[
          {"index": 0, "text": text, "logprobs": None, "finish_reason": stream.finish_reason}
        ],
        usage=self._usage(stream),
      ),
    )

  def _stream(self, stream, include_usage: bool) -> None:
    self.send_response(200)
    self.send_header("Content-Type", "text/event-stream")
    self.send_header("Cache-Control", "no-cache")
    self.send_header("Transfer-Encoding", "chunked")
    self.end_headers()
    head = self._header()
    chunk = lambda text, reason: dict(
      head, choices=[{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}]
    )
    detok = Detokenizer(self.server.tokenizer)
    try:
      for kind, value in stream.events(timeout=STREAM_TIMEOUT_S):
        if kind == "token":
          delta = detok.add(value)
          if delta:
            self._event(chunk(delta, None))
        elif kind == "done":
          self._event(chunk(detok.flush(), value))
        else:
          self._event(
            {"error": {"message": value, "type": "server_error", "param": None, "code": None}}
          )
      if include_usage:
        self._event(dict(head, choices=[], usage=self._usage(stream)))
      self._event("[DONE]")
      self._chunk("")  # the terminating zero-length chunk
    except TimeoutError as e:
      stream.cancel()
      try:
        self._event(
          {"error": {"message": str(e), "type": "server_error", "param": None, "code": None}}
        )
        self._chunk("")
      except _ClientGone:
        pass
      self.close_connection = True
    except _ClientGone:
      stream.cancel()
      self.close_connection = True


def make_server(
  engine, tokenizer, host: str = "127.0.0.1", port: int = 0, model_name: str = "dsv3_jax"
) -> CompletionServer:
  """A bound (not yet serving) server; port 0 picks a free port (see `server.url`)."""
  return CompletionServer((host, port), engine, tokenizer, model_name)


def serve_checkpoint(
  workdir: Optional[str] = None,
  hf_dir: Optional[str] = None,
  *,
  host: str = "127.0.0.1",
  port: int = 8000,
  slots: int = 8,
  max_len: Optional[int] = None,
  step: Optional[int] = None,
  tokenizer: Optional[str] = None,
  speculative: bool = False,
  eplb: bool = False,
  ready=None,
) -> None:
  """Loads a checkpoint (`serving/loading.py`), starts the engine and serves until
  interrupted. `ready(server)` is called once the socket listens."""
  from dsv3_jax.serving.engine import Engine
  from dsv3_jax.serving.loading import load

  served = load(workdir=workdir, hf_dir=hf_dir, step=step, tokenizer=tokenizer)
  engine = Engine(
    served.model,
    n_slots=slots,
    max_len=max_len,
    vocab_limit=served.tokenizer.vocab_size,
    eos_id=served.tokenizer.eos_id,
    speculative=speculative,
    eplb=eplb,
  )
  server = make_server(engine, served.tokenizer, host, port, served.name)
  engine.warmup()  # before the engine thread starts: every program compiled when it returns
  with engine:
    try:  # an interrupt as early as `ready` (the socket already listens) stops cleanly too
      if ready is not None:
        ready(server)
      server.serve_forever()
    except KeyboardInterrupt:
      pass
    finally:
      server.server_close()
