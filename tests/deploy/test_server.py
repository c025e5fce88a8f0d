"""The translation service in-process (fastapi's TestClient, httpx's ASGI transport): translations equal the
offline Translator's, alignments follow the cross-attention, concurrent requests share batches, and every
bad input is a 4xx whose JSON names the field, the value and the limit."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import torch

pytest.importorskip("fastapi", reason="the service needs the deploy extra: pip install 'qkv[deploy]'")
httpx = pytest.importorskip("httpx", reason="the service tests need the deploy extra: pip install 'qkv[deploy]'")

from fastapi.testclient import TestClient  # noqa: E402

from qkv.deploy.request import RequestError, ServeLimits, decode_json  # noqa: E402
from qkv.deploy.server import create_app, source_alignment  # noqa: E402
from qkv.train.translate import Translator  # noqa: E402

LIMITS = ServeLimits(max_sentences=4, max_chars=40, max_body_bytes=2000, max_beam=6)
SENTENCES = ["abc 12", "j, 9.", "0123", "hi"]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def client(translator: Translator):
    with TestClient(create_app(translator, limits=LIMITS, max_wait_ms=1)) as c:
        yield c


def offline(translator: Translator, sentences: list[str], beam: int) -> list[str]:
    return [t.text for t in translator.translate(sentences, beam=beam)]


def test_health_reports_ok_and_the_limits(client: TestClient) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok" and body["waiting_sentences"] == 0
    assert body["limits"] == {**LIMITS.to_dict(), "max_output_length": 1024}


@pytest.mark.parametrize("beam", [1, 5])
def test_translations_equal_the_offline_translators(client: TestClient, translator: Translator, beam: int) -> None:
    r = client.post("/translate", json={"text": SENTENCES, "beam": beam})
    assert r.status_code == 200
    want = offline(translator, SENTENCES, beam)
    assert len(set(want)) == len(want)  # distinct outputs: a result given to the wrong sentence would show
    assert r.json() == {"translations": [{"text": t} for t in want]}


def test_blank_strings_translate_to_empty_strings(client: TestClient, translator: Translator) -> None:
    r = client.post("/translate", json={"text": ["", "  ", "abc 12"], "beam": 2})
    assert r.status_code == 200
    assert r.json()["translations"] == [{"text": ""}, {"text": ""}, {"text": offline(translator, ["abc 12"], 2)[0]}]


def test_alignment_is_the_most_attended_source_token_averaged_over_layers_and_heads(
    client: TestClient, translator: Translator
) -> None:
    r = client.post("/translate", json={"text": ["abc 12", " "], "beam": 3, "alignment": True})
    assert r.status_code == 200
    got, blank = r.json()["translations"]
    [t] = translator.translate(["abc 12"], beam=3, need_attention=True)
    assert t.hypothesis is not None and t.hypothesis.cross_attention is not None
    attention = t.hypothesis.cross_attention.numpy()  # (layers, heads, T, S)
    assert attention.shape[2:] == (len(t.tgt_tokens), len(t.src_tokens))
    want = attention.mean(axis=(0, 1)).argmax(axis=-1).tolist()
    assert got == {"text": t.text, "source_tokens": t.src_tokens, "target_tokens": t.tgt_tokens, "alignment": want}
    assert blank == {"text": "", "source_tokens": [], "target_tokens": [], "alignment": []}


def test_source_alignment_averages_layers_and_heads_before_the_argmax() -> None:
    attention = torch.zeros(2, 2, 3, 4)  # (layers, heads, T, S)
    attention[:, :, :, 1] = 0.5  # every head: source 1 gets half of every row
    attention[1, 1, 0, 3] = 1.0  # one head of the last layer is sure of source 3 for the first token
    attention[0, :, 2, 2] = 0.9  # both heads of the first layer and one of the last lean to source 2
    attention[1, 0, 2, 2] = 0.9  # for the last token: 0.675 on average (the last layer alone: 0.45)
    assert source_alignment(attention) == [1, 1, 2]


def test_concurrent_requests_share_batches_and_each_gets_its_own_translations(translator: Translator) -> None:
    app = create_app(translator, limits=LIMITS, max_wait_ms=100)
    requests = [[SENTENCES[i % 4], SENTENCES[(i + 1) % 4]] for i in range(6)] + [[SENTENCES[3]]]

    async def main() -> tuple[list[Any], dict[str, Any]]:
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://qkv") as c:
                calls = [c.post("/translate", json={"text": text, "beam": 2}) for text in requests]
                responses = await asyncio.gather(*calls)
                health = (await c.get("/health")).json()
        return [r.json() for r in responses], health

    responses, health = asyncio.run(main())
    want = dict(zip(SENTENCES, offline(translator, SENTENCES, 2), strict=True))
    assert responses == [{"translations": [{"text": want[s]} for s in text]} for text in requests]
    assert 1 <= health["batches"] < len(requests)


def test_a_failing_model_is_a_500_and_the_service_goes_on(translator: Translator, monkeypatch) -> None:
    with TestClient(create_app(translator, limits=LIMITS, max_wait_ms=1)) as c:

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("out of memory")

        monkeypatch.setattr(translator, "translate", broken)
        r = c.post("/translate", json={"text": ["abc"]})
        assert (r.status_code, r.json()) == (
            500,
            {"error": {"message": "translation failed: RuntimeError: out of memory"}},
        )
        monkeypatch.undo()
        r = c.post("/translate", json={"text": ["abc"], "beam": 1})
        assert r.status_code == 200 and r.json()["translations"] == [{"text": offline(translator, ["abc"], 1)[0]}]


def test_a_wrong_path_or_method_is_a_json_error(client: TestClient) -> None:
    assert (client.get("/nope").status_code, client.get("/nope").json()) == (404, {"error": {"message": "Not Found"}})
    r = client.get("/translate")
    assert (r.status_code, r.json()) == (405, {"error": {"message": "Method Not Allowed"}})


def body(data: Any) -> bytes:
    return json.dumps(data).encode()


BAD_REQUESTS = [
    # (body, status, field, value echoed back, words of the message)
    (b"{bad", 400, "body", "{bad", "body is not JSON (Expecting property name"),
    (b'{"text": ["\xff"]}', 400, "body", '{"text": ["\ufffd"]}', "body is not UTF-8 (invalid start byte at byte 11)"),
    (b"[" * 1500, 400, "body", "[" * 80, "body nests too deep to parse; expected a JSON object (UTF-8)"),
    (body([1, 2]), 422, "body", "[1, 2]", "body must be a JSON object with the keys text, beam,"),
    (body({"text": ["a"], "bean": 5}), 422, "bean", 5, "unknown key 'bean'; expected one of the keys text, beam,"),
    (
        b'{"text": ["a"], "\\ud800": "\\udfff"}',
        422,
        "'\\ud800'",
        "'\\udfff'",
        "unknown key '\\ud800'",
    ),  # lone surrogates
    (body({"beam": 5}), 422, "text", None, "text is required: a list of 1 to 4 strings"),
    (body({"text": "abc"}), 422, "text", "abc", "text must be a list of 1 to 4 strings (the server's max_sentences)"),
    (
        body({"text": []}),
        422,
        "text",
        "[]",
        "text must be a list of 1 to 4 strings (the server's max_sentences); got []",
    ),
    (body({"text": ["a", 5]}), 422, "text[1]", 5, "text[1] must be a string; got 5"),
    (body({"text": ["a", None]}), 422, "text[1]", None, "text[1] must be a string; got None"),
    (body({"text": ["a"] * 5}), 413, "text", "a list of 5 strings", "1 to 4 strings (the server's max_sentences)"),
    (
        body({"text": ["a", "x" * 41]}),
        413,
        "text[1]",
        "a string of 41 characters",
        "text[1] must be a string of at most 40 characters (the server's max_chars); got a string of 41 characters",
    ),
    (body({"text": ["a"], "beam": 0}), 422, "beam", 0, "beam must be an int in [1, 6] (the server's max_beam"),
    (body({"text": ["a"], "beam": 7}), 422, "beam", 7, "beam must be an int in [1, 6] (the server's max_beam"),
    (body({"text": ["a"], "beam": "5"}), 422, "beam", "5", "beam must be an int in [1, 6]"),
    (body({"text": ["a"], "beam": 2.5}), 422, "beam", 2.5, "beam must be an int in [1, 6]"),
    (body({"text": ["a"], "beam": True}), 422, "beam", True, "beam must be an int in [1, 6]"),
    (body({"text": ["a"], "length_penalty": -1}), 422, "length_penalty", -1, "must be a number in [0, 10]"),
    (b'{"text": ["a"], "length_penalty": NaN}', 422, "length_penalty", "nan", "must be a number in [0, 10]"),
    (body({"text": ["a"], "max_output_length": 0}), 422, "max_output_length", 0, "an int in [1, 1024] (the model"),
    (body({"text": ["a"], "max_output_length": 5000}), 422, "max_output_length", 5000, "an int in [1, 1024]"),
    (body({"text": ["a"], "alignment": "yes"}), 422, "alignment", "yes", "alignment must be true or false"),
    (
        body({"text": ["a" * 40] * 4, "pad": "x" * 2000}),
        413,
        "body",
        f"{len(body({'text': ['a' * 40] * 4, 'pad': 'x' * 2000}))} bytes",
        "body must be at most 2000 bytes (the server's max_body_bytes)",
    ),
]


@pytest.mark.parametrize(("content", "status", "field", "value", "words"), BAD_REQUESTS)
def test_every_bad_request_is_a_4xx_naming_the_field_the_value_and_the_limit(
    client: TestClient, content: bytes, status: int, field: str, value: Any, words: str
) -> None:
    r = client.post("/translate", content=content)
    assert r.status_code == status
    error = r.json()["error"]
    assert (error["field"], error["value"]) == (field, value)
    assert words in error["message"] and error["expected"] in error["message"]


def test_a_body_streamed_past_the_limit_is_refused_before_it_is_read_in_full(client: TestClient) -> None:
    chunks = iter([b'{"text": ["', b"a" * 1500, b"a" * 1500, b'"]}'])  # no Content-Length: chunked
    r = client.post("/translate", content=chunks)
    assert r.status_code == 413
    assert r.json()["error"]["message"] == (
        "body must be at most 2000 bytes (the server's max_body_bytes); got more than 2000 bytes"
    )


def test_a_number_too_long_for_int_is_a_400_not_a_crash() -> None:
    with pytest.raises(RequestError) as caught:
        decode_json(b'{"beam": ' + b"9" * 5000 + b"}")  # Python converts at most 4300 digits
    assert caught.value.status == 400 and caught.value.field == "body"
    assert caught.value.message.startswith("body holds a number too long to read (Exceeds the limit")
