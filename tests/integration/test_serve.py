"""`vlmalign serve` against the official `openai` client: one real server (uvicorn in a thread, on a
tiny random-init llava) shared by the module; after every refused request it still answers a good
one with the library's own greedy output."""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
uvicorn = pytest.importorskip("uvicorn")

from PIL import Image  # noqa: E402

from vlmalign.serve import ServeLimits  # noqa: E402

KEY = "test-key"
NAME = "tiny"
LIMITS = ServeLimits(max_body_bytes=1_000_000, max_images=2, max_prompt_tokens=200, max_tokens=64)


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def _data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def _header_only_png(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width`` x ``height`` but which holds no such pixels: decoding
    it would fail, so a refusal that names the pixel limit shows nothing was decoded."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 8)) + chunk(b"IEND", b"")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from vlmalign.models import save_tiny
    from vlmalign.models.peft import load_any
    from vlmalign.serve.app import create_app
    tmp = tmp_path_factory.mktemp("serve")
    model_dir = save_tiny("llava", str(tmp / "model"))
    root, outside = tmp / "images", tmp / "outside"
    root.mkdir()
    outside.mkdir()
    red = _png(Image.new("RGB", (48, 40), (220, 30, 30)))
    (root / "red.png").write_bytes(red)
    (outside / "secret.png").write_bytes(red)
    Image.new("1", (8000, 6250)).save(root / "huge.png")   # 50 megapixels, one colour: a few KB
    ad = load_any(model_dir)
    ad.model.eval()
    app = create_app(ad, NAME, image_root=str(root), api_key=KEY, limits=LIMITS)
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not srv.started and time.time() < deadline:
        time.sleep(0.05)
    assert srv.started, "the server did not start"
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY, max_retries=0, timeout=120)
    ctx = {"client": client, "url": f"http://127.0.0.1:{port}", "ad": ad, "root": root, "outside": outside,
           "red": red, "model_dir": model_dir}
    yield ctx
    srv.should_exit = True
    thread.join(timeout=30)


def _ask(client, content, **kw):
    kw = {"max_tokens": 8, "temperature": 0, **kw}
    return client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": content}], **kw)


def _image_prompt(url, text="What colour is the shape?"):
    return [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]


@pytest.fixture(scope="module")
def reference(server):
    """The library's own greedy answer (rollout.generate) to the image prompt the tests send."""
    from vlmalign.data.batching import ImageLoader
    from vlmalign.data.schema import ImageRef, Message
    from vlmalign.rollout.generate import SamplingConfig, generate_batch
    ad = server["ad"]
    msgs = [Message.user(ImageRef(data=server["red"]), "What colour is the shape?")]
    out = generate_batch(ad, [msgs], ImageLoader(ad, None), SamplingConfig(max_new_tokens=8))[0][0]
    assert out, "the tiny model's greedy answer is empty: the comparison would prove nothing"
    return out


def _still_serves(server, reference):
    r = _ask(server["client"], _image_prompt(_data_url(server["red"])))
    assert r.choices[0].message.content.strip() == reference


def test_models_lists_the_served_model(server):
    assert [m.id for m in server["client"].models.list().data] == [NAME]


def test_greedy_answer_is_the_librarys(server, reference):
    r = _ask(server["client"], _image_prompt(_data_url(server["red"])))
    assert r.choices[0].message.content.strip() == reference
    assert r.choices[0].finish_reason in ("stop", "length") and r.model == NAME
    assert 0 < r.usage.completion_tokens <= 8 and r.usage.prompt_tokens > 0


def test_image_by_path_and_file_url_equals_data_url(server, reference):
    for url in ("red.png", str(server["root"] / "red.png"), "file://" + str(server["root"] / "red.png")):
        assert _ask(server["client"], _image_prompt(url)).choices[0].message.content.strip() == reference


def test_streaming_gives_the_same_text_in_pieces(server, reference):
    whole = _ask(server["client"], _image_prompt(_data_url(server["red"]))).choices[0].message.content
    chunks = list(_ask(server["client"], _image_prompt(_data_url(server["red"])), stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole and text.strip() == reference
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens > 0


def test_stop_strings_and_n(server):
    client = server["client"]
    full = _ask(client, "Tell me a story.", max_tokens=24).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = full[:full.index(stop)]
    r = _ask(client, "Tell me a story.", max_tokens=24, stop=[stop, "never-in-there"])
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       _ask(client, "Tell me a story.", max_tokens=24, stop=stop, stream=True))
    assert streamed == cut
    one = _ask(client, "Tell me a story.")
    r = _ask(client, "Tell me a story.", n=3, temperature=1.0, top_p=0.9, seed=1)
    assert [c.index for c in r.choices] == [0, 1, 2] and all(c.message.content is not None for c in r.choices)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens     # counted once, as OpenAI does
    again = _ask(client, "Tell me a story.", n=3, temperature=1.0, top_p=0.9, seed=1)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_sixteen_concurrent_requests_are_batched(server, reference):
    before = httpx.get(server["url"] + "/health").json()
    url = _data_url(server["red"])
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: _ask(server["client"], _image_prompt(url)), range(16)))
    assert [a.choices[0].message.content.strip() for a in answers] == [reference] * 16
    after = httpx.get(server["url"] + "/health").json()
    assert after["requests"] - before["requests"] == 16
    assert after["batches"] - before["batches"] < 16     # some requests shared a batch


def _raw(server, body: bytes | str, key=KEY):
    headers = {"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})}
    return httpx.post(server["url"] + "/v1/chat/completions", content=body, headers=headers, timeout=60)


def _refused(server, reference, status, code, *, sdk=None, raw=None, key=KEY, says=()):
    """The request is refused with ``status`` in OpenAI's error shape, and the server still serves."""
    if sdk is not None:
        with pytest.raises(openai.APIStatusError) as e:
            _ask(server["client"], sdk[0], **sdk[1])
        status_got, body = e.value.status_code, e.value.body
        body = {"error": body} if body and "error" not in body else body   # the SDK unwraps "error"
    else:
        r = _raw(server, raw, key=key)
        status_got, body = r.status_code, r.json()
    assert status_got == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == code, err
    for word in says:
        assert word in err["message"], err
    _still_serves(server, reference)
    return err


def test_paths_outside_the_root_are_refused(server, reference):
    secret = str(server["outside"] / "secret.png")
    for url in (secret, "../outside/secret.png", "file://" + secret):
        _refused(server, reference, 400, "image_outside_root", sdk=(_image_prompt(url), {}), says=("image root",))


def test_fifty_megapixel_images_are_refused_from_their_header(server, reference):
    err = _refused(server, reference, 400, "image_too_large", sdk=(_image_prompt("huge.png"), {}),
                   says=("50,000,000 pixels", "--max-image-pixels"))
    assert err["param"] == "messages.0.content.0.image_url.url"
    # a header that declares 50 megapixels over no pixel data: refused for its size, not as corrupt
    bomb = _data_url(_header_only_png(10000, 5000))
    _refused(server, reference, 400, "image_too_large", sdk=(_image_prompt(bomb), {}), says=("50,000,000 pixels",))


def test_truncated_json_is_a_400(server, reference):
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}'
    _refused(server, reference, 400, "invalid_json", raw=body, says=("not valid JSON",))


def test_unknown_model_is_a_404(server, reference):
    with pytest.raises(openai.NotFoundError) as e:
        server["client"].chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found" and "gpt-4o" in e.value.body["message"]
    _still_serves(server, reference)


def test_limits_are_refused_by_name(server, reference):
    red = _data_url(server["red"])
    _refused(server, reference, 400, "too_many_images", sdk=([*_image_prompt(red), *_image_prompt(red),
                                                              *_image_prompt(red)], {}), says=("--max-images",))
    _refused(server, reference, 400, "context_length_exceeded", sdk=("word " * 400, {}),
             says=("--max-prompt-tokens",))
    err = _refused(server, reference, 400, "invalid_value", sdk=("hi", {"max_tokens": 65}), says=("--max-tokens",))
    assert err["param"] == "max_tokens"
    err = _refused(server, reference, 400, "invalid_value", sdk=("hi", {"n": 9}), says=("--max-batch-size",))
    assert err["param"] == "n"
    _refused(server, reference, 413, "request_too_large", raw=b"{" + b" " * 1_100_000 + b"}",
             says=("--max-body-bytes",))


def test_other_bad_requests(server, reference):
    _refused(server, reference, 400, "invalid_image_url", sdk=(_image_prompt("https://example.com/a.png"), {}))
    _refused(server, reference, 400, "invalid_image_url", sdk=(_image_prompt("data:image/png;base64,@@@"), {}))
    _refused(server, reference, 400, "invalid_image", sdk=(_image_prompt(_data_url(b"not an image")), {}))
    _refused(server, reference, 400, "unsupported_parameter", sdk=("hi", {"logprobs": True}), says=("logprobs",))
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "foo": 1}'
    _refused(server, reference, 400, "unknown_parameter", raw=body, says=("foo",))
    _refused(server, reference, 400, "invalid_value", raw=b"[1, 2]", says=("must be a JSON object",))
    err = _refused(server, reference, 400, "invalid_value", sdk=("hi", {"temperature": 5}), says=("temperature",))
    assert err["param"] == "temperature"


def test_api_key_is_required(server, reference):
    _refused(server, reference, 401, "invalid_api_key", raw=b"{}", key=None, says=("no API key",))
    _refused(server, reference, 401, "invalid_api_key", raw=b"{}", key="wrong", says=("wrong API key",))
    bad = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_the_cli_serves_with_the_key_from_the_environment(server):
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLMALIGN_API_KEY": "env-key"}
    proc = subprocess.Popen([sys.executable, "-m", "vlmalign", "serve", "--model", server["model_dir"],
                             "--port", str(port), "--model-name", "cli-tiny", "--device", "cpu"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="env-key", max_retries=0)
        deadline = time.time() + 120
        while True:
            try:
                assert [m.id for m in client.models.list().data] == ["cli-tiny"]
                break
            except openai.APIConnectionError:
                assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
                time.sleep(0.5)
        r = client.chat.completions.create(model="cli-tiny", max_tokens=3,
                                           messages=[{"role": "user", "content": "hi"}])
        assert r.choices[0].finish_reason in ("stop", "length")
        with pytest.raises(openai.BadRequestError, match="local image paths are off"):
            client.chat.completions.create(model="cli-tiny", messages=[{"role": "user",
                                                                         "content": _image_prompt("red.png")}])
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_chat_and_serve_share_the_model_loading_options():
    from vlmalign.cli.main import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    loading = {"--model", "--base", "--trust-remote-code", "--dtype", "--device"}
    for cmd in ("chat", "serve"):
        assert loading <= {s for a in sub[cmd]._actions for s in a.option_strings}, cmd


def test_the_throughput_benchmark_runs(server):
    """Keeps benchmarks/serve_throughput.py working (its client side, against this server; untimed)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "serve_throughput.py"
    spec = importlib.util.spec_from_file_location("serve_throughput", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.run_level(server["url"], NAME, clients=2, requests=3, max_tokens=2, api_key=KEY)
    assert row["requests"] == 3 and row["requests_per_s"] > 0 and row["requests_per_batch"] >= 1
