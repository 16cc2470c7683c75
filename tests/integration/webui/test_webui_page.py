"""The web demo's logic and callbacks without a browser, on tiny random-init models: the page shows
the library's greedy answer, streamed; reset forgets; --compare answers with both models; bad
input becomes an error line and the conversation goes on."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from webui_helpers import MAX_NEW, QUESTION, library_answer

from vlmalign.rollout.chat import ChatSession
from vlmalign.rollout.generate import SamplingConfig
from vlmalign.webui import ChatModel, WebChat

GREEDY = (0.0, 1.0, MAX_NEW)   # temperature, top_p, max new tokens as the sliders send them


def _chat(tiny, n=1, **kw):
    models = [ChatModel(f"model-{i}", ad) for i, ad in enumerate(tiny.adapters[:n])]
    return WebChat(models, SamplingConfig(max_new_tokens=MAX_NEW), **kw)


def _last(updates):
    return updates[-1]


def test_a_turn_streams_the_librarys_greedy_answer_and_keeps_the_conversation(tiny):
    conv = _chat(tiny).conversation()
    updates = list(conv.send(QUESTION, tiny.image, *GREEDY))
    expected = library_answer(tiny.adapters[0], tiny.image, QUESTION)
    assert expected
    final = _last(updates).histories[0]
    assert final[0] == {"role": "user", "content": [{"path": tiny.image}, QUESTION]}
    assert final[1] == {"role": "assistant", "content": expected}
    assert updates[0].sent and updates[0].histories[0] == final[:1]   # the message shows at once
    partial = [u.histories[0][1]["content"] for u in updates if len(u.histories[0]) == 2]
    assert len(partial) > 2 and all(expected.startswith(p) for p in partial)   # token by token
    assert all(u.status == "" for u in updates)

    # a second turn reuses the image's features and answers as a terminal ChatSession does
    encoded = tiny.adapters[0].encoded_images
    second = _last(list(conv.send("And the background?", None, *GREEDY))).histories[0]
    assert tiny.adapters[0].encoded_images == encoded
    ref = ChatSession(tiny.adapters[0], max_new_tokens=MAX_NEW)
    ref.add_ref(conv.sessions[0].messages[0].images[0])
    assert ref.ask(QUESTION, out=io.StringIO()) == expected
    assert second[3]["content"] == ref.ask("And the background?", out=io.StringIO())
    assert len(second) == 4


def test_reset_forgets_the_conversation(tiny):
    conv = _chat(tiny).conversation()
    list(conv.send(QUESTION, tiny.image, *GREEDY))
    update = conv.reset()
    assert update.histories == [[]] and update.status == "conversation reset"
    assert conv.sessions[0].messages == [] and conv.shown == {}
    text_only = _last(list(conv.send("Hello", None, *GREEDY))).histories[0]
    assert text_only[1]["content"] == library_answer(tiny.adapters[0], None, "Hello")


def test_compare_answers_with_both_models(tiny):
    conv = _chat(tiny, n=2).conversation()
    updates = list(conv.send(QUESTION, tiny.image, *GREEDY))
    panes = _last(updates).histories
    answers = [p[1]["content"] for p in panes]
    assert answers == [library_answer(ad, tiny.image, QUESTION) for ad in tiny.adapters]
    assert answers[0] != answers[1]   # two models, two answers
    # the second pane waits (the message shown, no answer) while the first streams
    assert any(len(u.histories[0]) == 2 and len(u.histories[1]) == 1 for u in updates)


@pytest.mark.parametrize("text,image,settings,says", [
    ("", None, GREEDY, "type a message"),
    ("", "IMAGE", GREEDY, "type a message to send with the image"),
    ("what is <image> here?", None, GREEDY, "show an image by uploading it instead"),
    (QUESTION, None, (-1.0, 1.0, MAX_NEW), "temperature"),
    (QUESTION, None, (0.0, 0.0, MAX_NEW), "top_p"),
    (QUESTION, None, (0.0, 1.0, 0), "max_new_tokens"),
    (QUESTION, None, ("hot", 1.0, MAX_NEW), "must be numbers"),
    (QUESTION, "CORRUPT", GREEDY, "image"),
    (QUESTION, "LARGE", GREEDY, "pixel budget"),
    (QUESTION, "MISSING", GREEDY, "cannot read the uploaded image"),
])
def test_bad_input_is_an_error_line_and_the_conversation_goes_on(tiny, tmp_path, text, image, settings, says):
    conv = _chat(tiny, n=2, max_pixels=48 * 40).conversation()
    list(conv.send(QUESTION, tiny.image, *GREEDY))
    before = [list(s.messages) for s in conv.sessions]
    files = {"IMAGE": tiny.image, "CORRUPT": tmp_path / "bad.png", "LARGE": tmp_path / "large.png",
             "MISSING": tmp_path / "nope.png"}
    (tmp_path / "bad.png").write_bytes(b"not an image")
    Image.new("RGB", (49, 40)).save(tmp_path / "large.png")
    updates = list(conv.send(text, str(files[image]) if image else None, *settings))
    assert len(updates) == 1 and updates[0].status.startswith("error: ") and says in updates[0].status
    assert not updates[0].sent   # the page keeps the message and the image to fix
    assert [s.messages for s in conv.sessions] == before and all(not s.pending for s in conv.sessions)
    after = _last(list(conv.send("And now?", None, *GREEDY)))
    assert after.status == "" and [len(h) for h in after.histories] == [4, 4]


def test_stop_ends_the_turn_and_forgets_it(tiny):
    conv = _chat(tiny, n=2).conversation()
    list(conv.send(QUESTION, tiny.image, *GREEDY))
    turn = conv.send("And now?", None, *GREEDY)
    first = next(turn)
    assert first.sent and [len(h) for h in first.histories] == [3, 3]
    conv.stop()   # the Stop button, pressed before the first pane answered
    rest = list(turn)
    assert rest[-1].status.startswith("stopped") and [len(h) for h in rest[-1].histories] == [2, 2]
    assert [len(s.messages) for s in conv.sessions] == [2, 2]

    # a stream the page stops reading (a closed tab) ends its generation and leaves no trace
    turn = conv.send("Again?", None, *GREEDY)
    next(turn), next(turn)
    turn.close()
    assert [len(s.messages) for s in conv.sessions] == [2, 2] and conv._turn is None


def test_page_callbacks_clear_inputs_after_sending_and_pick_images_under_the_root(tiny):
    pytest.importorskip("gradio", reason="the webui extra (gradio) is not installed")
    import gradio as gr

    from vlmalign.webui.app import Page
    page = Page(_chat(tiny, image_root=str(tiny.root)))
    assert page.images == ["square.png"]
    conv = page.start()
    outs = list(page.send(conv, QUESTION, tiny.image, *GREEDY))
    history, text, image, status = outs[-1]
    assert history[1]["content"] == library_answer(tiny.adapters[0], tiny.image, QUESTION)
    assert (text, image, status) == ("", None, "")
    _, text, image, status = list(page.send(conv, "", None, *GREEDY))[-1]
    assert text == gr.skip() and image == gr.skip() and status.startswith("error: type a message")
    history, text, image, status = page.reset(conv)
    assert history == [] and status == "conversation reset"
    picked, status = page.pick("square.png")
    assert picked.size == (48, 40) and status == ""
    picked, status = page.pick("../escape.png")
    assert picked == gr.skip() and "escapes the image root" in status
    page.build()   # the Blocks build without a server


def test_cli_refuses_a_missing_image_root_before_loading(tiny, capsys):
    pytest.importorskip("gradio", reason="the webui extra (gradio) is not installed")
    from vlmalign.cli.main import main
    assert main(["webui", "--model", tiny.dirs[0], "--image-root", str(tiny.root / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_command_serves_both_models_on_localhost_and_refuses_a_taken_port(tiny, capsys, monkeypatch):
    gr = pytest.importorskip("gradio", reason="the webui extra (gradio) is not installed")
    import socket
    import urllib.request

    from vlmalign.cli.main import main
    seen = {}

    def visit(demo):   # instead of waiting for Ctrl-C: fetch the page, then stop
        seen["url"], seen["host"] = demo.local_url, demo.server_name
        seen["page"] = urllib.request.urlopen(demo.local_url, timeout=30).read().decode()
        demo.close()

    monkeypatch.setattr(gr.Blocks, "block_thread", visit)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        taken.listen()
        assert main(["webui", "--model", tiny.dirs[0], "--port", str(port)]) == 2
        assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["webui", "--model", tiny.dirs[0], "--compare", tiny.dirs[1], "--port", str(port),
                 "--max-new-tokens", "4"]) == 0
    assert seen["host"] == "127.0.0.1" and f":{port}" in seen["url"] and "vlmalign webui" in seen["page"]
    assert f"{tiny.dirs[0]} and {tiny.dirs[1]}" in capsys.readouterr().out
