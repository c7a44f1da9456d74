"""The HTTP endpoint, end to end: `experiments/serve.py` in a subprocess on 127.0.0.1, a real
HTTP client, greedy text equal to `experiments/decode.py`'s for the same export."""

import dataclasses
import http.client
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
import warnings

import pytest

from configs import dsv3
from dsv3_jax import config as config_lib
from dsv3_jax import model as model_lib
from dsv3_jax.pretrained import save_orbax

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NEW = 12
PROMPTS = ["def ", "import os\n", "h\u00e9llo w\u00f6rld \u2603"]
SLOTS = 8


def _env():
  env = dict(os.environ, PYTHONIOENCODING="utf-8", JAX_PLATFORMS="cpu")
  # Identical programs compile once across the test process and its subprocesses.
  import jax

  cache = jax.config.jax_compilation_cache_dir
  if cache:
    env.update(
      JAX_COMPILATION_CACHE_DIR=cache,
      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
      JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
  return env


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  cfg = config_lib.from_dict(dsv3.get_config("tiny")).model
  # A larger init makes the random model's argmax decisive (no near-ties).
  model = model_lib.create(dataclasses.replace(cfg, init_std=0.5), seed=3)
  path = str(tmp_path_factory.mktemp("export") / "tiny")
  save_orbax(model, path)
  return path


class _Server:
  """`python -m experiments.serve` on a free port; `rss()` reads its resident memory."""

  def __init__(self, workdir: str, ignore_sigint: bool = False):
    cmd = [
      sys.executable,
      "-m",
      "experiments.serve",
      f"--workdir={workdir}",
      "--port=0",
      "--host=127.0.0.1",
      f"--slots={SLOTS}",
    ]
    if ignore_sigint:  # started the way a parent that ignores SIGINT starts it (exec keeps it)
      exec_ignoring = "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
      exec_ignoring += "os.execv(sys.argv[1], sys.argv[1:])"
      cmd = [sys.executable, "-c", exec_ignoring] + cmd
    self.proc = subprocess.Popen(
      cmd,
      cwd=ROOT,
      env=_env(),
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      encoding="utf-8",
    )
    self.lines: queue.Queue = queue.Queue()
    self.log: list = []
    threading.Thread(target=self._pump, daemon=True).start()
    self.host, self.port, self.name = None, None, None

  def _pump(self):
    for line in self.proc.stdout:
      self.log.append(line)
      self.lines.put(line)

  def wait_ready(self, timeout=900):
    deadline = time.time() + timeout
    while time.time() < deadline:
      try:
        line = self.lines.get(timeout=1)
      except queue.Empty:
        if self.proc.poll() is not None:
          break
        continue
      m = re.match(r"serving (\S+) on http://([\d.]+):(\d+)", line)
      if m:
        self.name, self.host, self.port = m.group(1), m.group(2), int(m.group(3))
        return self
    raise RuntimeError("the server did not come up:\n" + "".join(self.log[-40:]))

  def rss_bytes(self) -> int:
    with open(f"/proc/{self.proc.pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")

  def close(self):
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGINT)
      try:
        self.proc.wait(60)
      except subprocess.TimeoutExpired:
        # Say where it is stuck (the server dumps its threads' stacks on SIGUSR1), then stop it.
        self.proc.send_signal(signal.SIGUSR1)
        time.sleep(3)
        self.proc.kill()
        self.proc.wait()
        warnings.warn(
          "the server did not exit within 60 s of SIGINT; its last output:\n"
          + "".join(self.log[-120:])
        )


@pytest.fixture(scope="module")
def decoded(export):
  """decode.py's greedy continuation of each prompt, started before the server."""
  cmd = [
    sys.executable,
    "-m",
    "experiments.decode",
    f"--workdir={export}",
    "--temperature=0",
    f"--max_new_tokens={NEW}",
  ] + [f"--prompt={p}" for p in PROMPTS]
  return subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def reference(decoded):
  out, err = decoded.communicate(timeout=900)
  assert decoded.returncode == 0, err.decode()[-3000:]
  out = out.decode("utf-8")  # bytes: a generated "\r" must not become "\n"
  bar = "=" * 72 + "\n"
  samples = out.split(bar)[1:-1]
  assert len(samples) == len(PROMPTS), out
  texts = {}
  for prompt, sample in zip(PROMPTS, samples):
    assert sample.startswith(prompt) and sample.endswith("\n")
    texts[prompt] = sample[len(prompt) : -1]
  return texts


@pytest.fixture(scope="module")
def server(export, decoded):
  srv = _Server(export)
  try:
    yield srv.wait_ready()
  finally:
    srv.close()


def _post(server, body, raw=None):
  conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
  data = raw if raw is not None else json.dumps(body).encode()
  conn.request("POST", "/v1/completions", body=data, headers={"Content-Type": "application/json"})
  resp = conn.getresponse()
  payload = resp.read()
  conn.close()
  return resp, payload


def _complete(server, **body):
  resp, payload = _post(server, body)
  assert resp.status == 200, payload
  return json.loads(payload)


def _stream(server, **body):
  """(chunks, saw [DONE]) of a streaming completion, read line by line as it arrives."""
  conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
  conn.request(
    "POST",
    "/v1/completions",
    body=json.dumps(dict(body, stream=True)),
    headers={"Content-Type": "application/json"},
  )
  resp = conn.getresponse()
  assert resp.status == 200, resp.read()
  assert resp.getheader("Content-Type") == "text/event-stream"
  chunks, done = [], False
  for line in resp:
    line = line.decode().rstrip("\n")
    if not line:
      continue
    assert line.startswith("data: "), line
    data = line[len("data: ") :]
    assert not done, "data after [DONE]"
    if data == "[DONE]":
      done = True
    else:
      chunks.append(json.loads(data))
  conn.close()
  return chunks, done


def test_models(server):
  conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
  conn.request("GET", "/v1/models")
  resp = conn.getresponse()
  body = json.loads(resp.read())
  assert resp.status == 200
  assert body["object"] == "list" and body["data"][0]["id"] == server.name == "tiny"
  conn.request("GET", "/nowhere")
  resp = conn.getresponse()
  assert resp.status == 404 and "error" in json.loads(resp.read())


def test_greedy_equals_decode_binary(server, reference):
  for prompt in PROMPTS:
    out = _complete(server, prompt=prompt, max_tokens=NEW, temperature=0)
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert out["id"].startswith("cmpl-") and isinstance(out["created"], int)
    choice = out["choices"][0]
    assert choice["index"] == 0 and choice["finish_reason"] in ("stop", "length")
    assert choice["text"] == reference[prompt]
    usage = out["usage"]
    assert usage["prompt_tokens"] == len(prompt.encode())
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert (usage["completion_tokens"] == NEW) == (choice["finish_reason"] == "length")


def test_stream_equals_decode_binary_concurrently(server, reference):
  results = {}

  def run(i, prompt):
    results[i] = _stream(
      server, prompt=prompt, max_tokens=NEW, temperature=0, stream_options={"include_usage": True}
    )

  # Each prompt twice at once (with sampled requests beside them): 9 requests, 8 slots.
  jobs = list(enumerate(PROMPTS * 2))
  threads = [threading.Thread(target=run, args=job) for job in jobs]
  threads += [
    threading.Thread(
      target=_complete, args=(server,), kwargs=dict(prompt="x = ", max_tokens=30, temperature=1.0)
    )
    for _ in range(3)
  ]
  for t in threads:
    t.start()
  for t in threads:
    t.join(600)
  for i, prompt in jobs:
    chunks, done = results[i]
    assert done
    *text_chunks, usage_chunk = chunks
    assert "".join(c["choices"][0]["text"] for c in text_chunks) == reference[prompt]
    assert [c["choices"][0]["finish_reason"] for c in text_chunks[:-1]] == [None] * (
      len(text_chunks) - 1
    )
    assert text_chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] <= NEW
    assert len({c["id"] for c in chunks}) == 1


@pytest.mark.parametrize(
  "body, param, match",
  [
    (dict(prompt=""), "prompt", "empty"),
    (dict(max_tokens=4), "prompt", "required"),
    (dict(prompt=5), "prompt", "must be a string"),
    (dict(prompt="a", max_tokens="5"), "max_tokens", "must be an integer"),
    (dict(prompt="a", max_tokens=2.5), "max_tokens", "must be an integer"),
    (dict(prompt="a", temperature="hot"), "temperature", "must be a number"),
    (dict(prompt="a", stream="yes"), "stream", "must be a boolean"),
    (dict(prompt="a", max_tokens=True), "max_tokens", "must be an integer"),
    (dict(prompt="a", temperature=-1), "temperature", "temperature"),
    (dict(prompt="a", top_p=0), "top_p", "top_p"),
    (dict(prompt="a", max_tokens=0), "max_tokens", "max_tokens"),
    (dict(prompt="a" * 250, max_tokens=10), "max_tokens", "exceeds the context"),
    (dict(prompt="a", frobnicate=1), "frobnicate", "unknown field"),
    (dict(prompt="a", stop=["\n"]), "stop", "not supported"),
    (dict(prompt="a", n=2), "n", "n must be 1"),
    (dict(prompt="a", model="gpt-9"), "model", "not served"),
  ],
)
def test_bad_request_400(server, body, param, match):
  resp, payload = _post(server, body)
  assert resp.status == 400, payload
  err = json.loads(payload)["error"]
  assert err["type"] == "invalid_request_error" and err["param"] == param
  assert re.search(match, err["message"]), err["message"]


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_bad_json_400(server, raw):
  resp, payload = _post(server, None, raw=raw)
  assert resp.status == 400, payload
  assert json.loads(payload)["error"]["type"] == "invalid_request_error"


def test_sigusr1_dumps_every_thread_and_keeps_serving(server, reference):
  # Every thread: the engine loop's and the main thread's HTTP loop.
  expected = ("in _serve_forever", "Current thread", "socketserver.py")
  seen = len(server.log)
  server.proc.send_signal(signal.SIGUSR1)
  deadline = time.time() + 30
  dump = ""
  while time.time() < deadline and not all(e in dump for e in expected):
    time.sleep(0.1)
    dump = "".join(server.log[seen:])
  for e in expected:
    assert e in dump, dump[-3000:]
  out = _complete(server, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
  assert out["choices"][0]["text"] == reference[PROMPTS[0]]


def test_sigint_stops_a_server_started_with_sigint_ignored(export):
  # A parent that ignores SIGINT (pytest's process, once an earlier test left it so; a
  # shell's background job) passes that on; the server must still stop on it, promptly and cleanly.
  ignoring = _Server(export, ignore_sigint=True)
  try:
    ignoring.wait_ready()
    ignoring.proc.send_signal(signal.SIGINT)
    assert ignoring.proc.wait(30) == 0, "".join(ignoring.log[-40:])
  finally:
    if ignoring.proc.poll() is None:
      ignoring.proc.kill()
      ignoring.proc.wait()


def test_an_interrupt_while_ready_runs_stops_cleanly(export):
  # SIGINT can land once the `serving ...` line is out but before `ready` has returned (the
  # test above saw it: exit -2 from a KeyboardInterrupt in the print); it stops the server as
  # cleanly as one during `serve_forever`: `serve_checkpoint` returns.
  from dsv3_jax.serving.http import serve_checkpoint

  def ready(srv):
    raise KeyboardInterrupt

  try:
    serve_checkpoint(export, port=0, slots=2, ready=ready)
  except KeyboardInterrupt:  # caught here, so that a regression fails this test, not the run
    pytest.fail("the interrupt escaped serve_checkpoint")


def test_every_program_is_compiled_before_the_server_listens(export):
  """`ready` (the moment the server prints `serving ...`) comes after the warmup has compiled
  the prefill, the insert, the decode step and the slot release: the first request pays no
  compile."""
  from dsv3_jax.serving.http import serve_checkpoint

  compiled = {}

  def ready(srv):
    program = srv.engine.program
    for name in ("_prefill", "_insert", "_step", "_release"):
      compiled[name] = getattr(program, name)._cache_size()
    threading.Thread(target=srv.shutdown).start()

  serve_checkpoint(export, port=0, slots=2, ready=ready)
  assert compiled == {"_prefill": 1, "_insert": 1, "_step": 1, "_release": 1}


def test_client_disconnect_frees_slot(server, reference):
  # Fill every slot with long streams and hang up on them after their first bytes.
  conns = []
  for _ in range(SLOTS):
    conn = http.client.HTTPConnection(server.host, server.port, timeout=600)
    conn.request(
      "POST",
      "/v1/completions",
      body=json.dumps(
        dict(prompt="a", max_tokens=200, temperature=1.0, ignore_eos=True, stream=True)
      ),
      headers={"Content-Type": "application/json"},
    )
    conns.append((conn, conn.getresponse()))
  for conn, resp in conns:
    resp.fp.readline()
    conn.sock.close()
    conn.close()
  out = _complete(server, prompt=PROMPTS[0], max_tokens=NEW, temperature=0)
  assert out["choices"][0]["text"] == reference[PROMPTS[0]]


@pytest.mark.slow
def test_soak_32_streaming_clients(server, reference):
  """32 clients stream for a bounded time, some bad requests among them: every good stream
  ends with [DONE] and the promised token count, every bad one gets its 400, and the server's
  resident memory stays flat after warm-up."""
  duration = float(os.environ.get("DSV3_SOAK_SECONDS", 60))
  warmup = min(15.0, duration / 4)
  stop_at = time.time() + duration
  problems, counts, ids = [], {"ok": 0, "bad": 0}, []
  lock = threading.Lock()
  rss = []

  def client(i):
    rng = random.Random(i)
    while time.time() < stop_at:
      if rng.random() < 0.05:  # a bad request on purpose
        resp, payload = _post(server, dict(prompt="", max_tokens=4))
        with lock:
          if resp.status == 400 and json.loads(payload)["error"]["param"] == "prompt":
            counts["bad"] += 1
          else:
            problems.append(f"bad request got {resp.status}: {payload[:200]}")
        continue
      greedy = rng.random() < 0.3
      prompt = rng.choice(PROMPTS) if greedy else "q%d " % rng.randrange(1000)
      max_tokens = NEW if greedy else rng.randrange(4, 32)
      try:
        chunks, done = _stream(
          server,
          prompt=prompt,
          max_tokens=max_tokens,
          temperature=0 if greedy else 1.0,
          ignore_eos=not greedy,
          stream_options={"include_usage": True},
        )
      except Exception as e:  # noqa: BLE001
        with lock:
          problems.append(f"client {i}: {type(e).__name__}: {e}")
        continue
      usage = chunks[-1].get("usage") if chunks else None
      text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
      with lock:
        if not done or usage is None:
          problems.append(f"client {i}: stream without [DONE] or usage")
        elif not greedy and usage["completion_tokens"] != max_tokens:
          problems.append(f"client {i}: {usage['completion_tokens']} tokens, not {max_tokens}")
        elif greedy and text != reference[prompt]:
          problems.append(f"client {i}: greedy text {text!r} != {reference[prompt]!r}")
        else:
          counts["ok"] += 1
          ids.append(chunks[0]["id"])

  threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(32)]
  for t in threads:
    t.start()
  while time.time() < stop_at:
    time.sleep(1.0)
    rss.append((time.time() - (stop_at - duration), server.rss_bytes()))
  for t in threads:
    t.join(600)
  assert not any(t.is_alive() for t in threads)
  assert not problems, problems[:10]
  assert counts["ok"] > 32 and counts["bad"] > 0, counts
  assert len(ids) == len(set(ids)), "a completion id was served twice"
  after = [m for t, m in rss if t >= warmup]
  early = max(after[:3])
  late = max(after[-3:])
  print(
    f"soak: {counts['ok']} streams, {counts['bad']} bad requests refused in {duration:.0f} s; "
    f"RSS {early / 2**20:.0f} MiB after warm-up, {late / 2**20:.0f} MiB at the end"
  )
  assert late <= early * 1.05 + (32 << 20), (
    f"RSS grew from {early / 2**20:.0f} MiB to {late / 2**20:.0f} MiB after warm-up"
  )
