"""Configs from dicts (validation) and save/load through safetensors + config.json (exact round trips)."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from qkv.models import (
    EncoderConfig,
    LMConfig,
    TransformerConfig,
    TransformerEncoder,
    TransformerLM,
    TransformerSeq2Seq,
    load_model,
    save_model,
)
from qkv.nn.multi_head import unstack_projections


@pytest.fixture
def no_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading must never unpickle."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a checkpoint was unpickled")

    for target, name in ((torch, "load"), (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, refuse)


SEQ2SEQ = {
    "src_vocab_size": 11,
    "tgt_vocab_size": 11,
    "d_model": 16,
    "num_heads": 4,
    "encoder_layers": 1,
    "decoder_layers": 2,
    "ffn_dim": 24,
    "dropout": 0.0,
}
LM = {"vocab_size": 13, "d_model": 16, "num_heads": 4, "num_layers": 2, "ffn_dim": 24, "dropout": 0.0}
ENCODER = {
    "vocab_size": 13,
    "hidden_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 24,
}


def outputs(model: torch.nn.Module) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    if isinstance(model, TransformerSeq2Seq):
        src, tgt = torch.randint(0, 11, (2, 5), generator=g), torch.randint(0, 11, (2, 4), generator=g)
        return model(src, torch.tensor([5, 3]), tgt).logits
    if isinstance(model, TransformerLM):
        return model(torch.randint(0, 13, (2, 5), generator=g))
    return model(torch.randint(0, 13, (2, 5), generator=g)).last_hidden_state


def perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Weights no constructor makes, so a load that silently kept fresh weights fails."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.mark.parametrize(
    "model",
    [
        lambda: TransformerSeq2Seq(
            TransformerConfig(**SEQ2SEQ, shared_vocab=True, positional="learned", max_positions=8)
        ),
        lambda: TransformerSeq2Seq(TransformerConfig(**SEQ2SEQ, tie_embeddings=False, norm_first=True, kv_heads=2)),
        lambda: TransformerLM(LMConfig(**LM)),
        lambda: TransformerLM(LMConfig(**LM, tie_embeddings=False, positional="rotary")),
        lambda: TransformerEncoder(EncoderConfig(**ENCODER)),
    ],
    ids=["seq2seq-shared-tied", "seq2seq-untied", "lm-tied", "lm-untied", "encoder"],
)
def test_save_load_round_trips_exactly(tmp_path: Path, no_pickle: None, model) -> None:
    torch.manual_seed(0)
    original = perturbed(model())
    save_model(original, tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert config["model_type"] == type(original).model_type

    loaded = load_model(tmp_path / "ckpt")
    assert type(loaded) is type(original) and loaded.config == original.config and not loaded.training
    assert torch.equal(outputs(loaded), outputs(original))
    original_params = dict(original.named_parameters())
    for name, p in loaded.named_parameters():
        assert torch.equal(p, original_params[name])
    assert len(list(loaded.parameters())) == len(list(original.parameters()))  # ties restored, not duplicated


def test_tied_weights_are_stored_once_and_re_tied(tmp_path: Path) -> None:
    model = perturbed(TransformerSeq2Seq(TransformerConfig(**SEQ2SEQ, shared_vocab=True)))
    save_model(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "encoder.embed_tokens.weight" in keys
    assert "decoder.embed_tokens.weight" not in keys and "decoder.output_projection.weight" not in keys
    loaded = load_model(tmp_path)
    assert loaded.decoder.output_projection.weight is loaded.encoder.embed_tokens.weight
    assert loaded.decoder.embed_tokens.weight is loaded.encoder.embed_tokens.weight


def test_float64_round_trip(tmp_path: Path) -> None:
    model = perturbed(TransformerLM(LMConfig(**LM)).double())
    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert loaded.lm_head.weight.dtype == torch.float64
    assert torch.equal(outputs(loaded), outputs(model))


def edit_config(directory: Path, **changes: object) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def test_incompatible_checkpoints_name_what_differs(tmp_path: Path) -> None:
    save_model(TransformerLM(LMConfig(**LM, tie_embeddings=False)), tmp_path)
    edit_config(tmp_path, num_layers=1)
    with pytest.raises(
        ValueError, match=r"unexpected keys: layers\.1\.linear1\.bias, .*layers\.1\.self_attn\.out_proj\.weight"
    ):
        load_model(tmp_path)
    edit_config(tmp_path, num_layers=3)
    with pytest.raises(
        ValueError,
        match=r"missing keys: layers\.2\.self_attn\.in_proj\.weight, .*layers\.2\.self_attn\.out_proj\.weight",
    ):
        load_model(tmp_path)
    edit_config(tmp_path, num_layers=2, ffn_dim=32)
    mismatch = r"shape mismatches: layers\.0\.linear1\.weight: checkpoint \(24, 16\), model \(32, 16\)"
    with pytest.raises(ValueError, match=mismatch):
        load_model(tmp_path)
    edit_config(tmp_path, ffn_dim=24, tie_embeddings=True)
    with pytest.raises(ValueError, match=r"unexpected keys: lm_head\.weight"):
        load_model(tmp_path)
    edit_config(tmp_path, tie_embeddings=False, dropout_rate=0.1)
    with pytest.raises(ValueError, match=r"unknown LMConfig key\(s\): 'dropout_rate'"):
        load_model(tmp_path)
    edit_config(tmp_path, model_type="gpt5")
    with pytest.raises(ValueError, match=r"unknown model_type 'gpt5'"):
        load_model(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load_model(tmp_path / "nowhere")


def test_a_file_with_separate_qkv_projections_loads(tmp_path: Path) -> None:
    """Model files written before the fused in_proj (q_proj, k_proj, v_proj apart) load, stacked."""
    torch.manual_seed(0)
    model = TransformerLM(LMConfig(**LM, kv_heads=2))
    save_model(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    old = unstack_projections(load_file(str(weights)), kv_width=8)
    assert "layers.0.self_attn.q_proj.weight" in old and not any("in_proj" in k for k in old)
    save_file(old, str(weights))  # as the old code wrote it, minus the digests (files without them load)
    loaded = load_model(tmp_path)
    tokens = torch.tensor([[1, 2, 3, 4]])
    torch.testing.assert_close(loaded(tokens), model.eval()(tokens), atol=0, rtol=0)


def test_only_registered_models_are_saved(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot save a Linear"):
        save_model(torch.nn.Linear(2, 2), tmp_path)


# Configs


def test_config_from_dict_round_trips() -> None:
    for cls, args in ((TransformerConfig, SEQ2SEQ), (LMConfig, LM), (EncoderConfig, ENCODER)):
        config = cls.from_dict(args)
        assert cls.from_dict(config.to_dict()) == config
        assert json.loads(json.dumps(config.to_dict())) == config.to_dict()


def test_unknown_and_missing_keys_are_named() -> None:
    unknown = r"unknown TransformerConfig key\(s\): 'dmodel', 'heads'; valid keys: .*d_model"
    with pytest.raises(ValueError, match=unknown):
        TransformerConfig.from_dict({**SEQ2SEQ, "dmodel": 3, "heads": 2})
    with pytest.raises(ValueError, match=r"TransformerConfig needs key\(s\) 'tgt_vocab_size'"):
        TransformerConfig.from_dict({"src_vocab_size": 5})
    with pytest.raises(TypeError, match="needs a mapping; got list"):
        LMConfig.from_dict([("vocab_size", 3)])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"d_model": "16"}, r"d_model must be an int >= 1; got '16'"),
        ({"num_heads": 0}, r"num_heads must be an int >= 1; got 0"),
        ({"num_heads": 3}, r"d_model=16 must be a multiple of num_heads=3"),
        ({"kv_heads": 3}, r"num_heads=4 must be a multiple of kv_heads=3"),
        ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\); got 1.0"),
        ({"activation": "swish"}, r"activation must be one of 'relu', 'gelu'; got 'swish'"),
        ({"positional": "alibi"}, r"positional must be one of 'sinusoidal', 'learned', 'rotary'; got 'alibi'"),
        ({"norm_first": "yes"}, r"norm_first must be true or false; got 'yes'"),
        ({"shared_vocab": True, "tgt_vocab_size": 12}, r"shared_vocab=True needs src_vocab_size == tgt_vocab_size"),
        ({"eos_id": 11}, r"eos_id=11 must be < tgt_vocab_size=11"),
        ({"d_model": 24, "num_heads": 8, "positional": "rotary"}, r"rotary positions need an even head dimension"),
        ({"layer_norm_eps": 0}, r"layer_norm_eps must be a positive number; got 0"),
    ],
)
def test_bad_config_values_are_named(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TransformerConfig.from_dict({**SEQ2SEQ, **changes})


def test_lm_and_encoder_config_errors() -> None:
    with pytest.raises(ValueError, match=r"eos_id=13 must be < vocab_size=13"):
        LMConfig(**LM, eos_id=13)
    with pytest.raises(ValueError, match=r"hidden_size=16 must be a multiple of num_attention_heads=3"):
        EncoderConfig.from_dict({**ENCODER, "num_attention_heads": 3})
    with pytest.raises(ValueError, match=r"hidden_act must be one of 'relu', 'gelu'; got 'gelu_new'"):
        EncoderConfig.from_dict({**ENCODER, "hidden_act": "gelu_new"})


def flip_last_byte(path: Path) -> None:
    """Flip the bits of the file's last byte: inside the last tensor's data, the header untouched."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_truncated_weight_file_is_a_value_error_naming_it(tmp_path: Path) -> None:
    save_model(TransformerLM(LMConfig(**LM)), tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"model\.safetensors is not a readable safetensors file"):
        load_model(tmp_path)


def test_flipped_weight_bytes_are_caught_by_the_recorded_digests(tmp_path: Path) -> None:
    save_model(TransformerLM(LMConfig(**LM)), tmp_path)
    flip_last_byte(tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.safetensors is damaged: the SHA-256 of \S+ differs"):
        load_model(tmp_path)


def test_weights_written_without_digests_still_load(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    model = perturbed(TransformerLM(LMConfig(**LM)))
    save_model(model, tmp_path)
    weights = tmp_path / "model.safetensors"
    save_file(load_file(str(weights)), str(weights), metadata={"format": "pt"})  # as qkv wrote them before
    assert torch.equal(outputs(load_model(tmp_path)), outputs(model))


def test_a_config_far_bigger_than_its_weights_is_refused_before_allocating(tmp_path: Path) -> None:
    save_model(TransformerLM(LMConfig(**LM)), tmp_path)
    edit_config(tmp_path, d_model=1_048_576, ffn_dim=1_048_576)  # ~4 TB of float32 parameters
    with pytest.raises(
        ValueError,
        match=r"shape mismatches: embed_tokens\.weight: checkpoint \(13, 16\), "
        r"model \(13, 1048576\)",
    ):
        load_model(tmp_path)
    edit_config(tmp_path, d_model=16, ffn_dim=24, num_layers=10**9)
    with pytest.raises(ValueError, match=r"num_layers is 1000000000 but .*model\.safetensors holds only \d+ tensors"):
        load_model(tmp_path)


@pytest.mark.parametrize("name", ["config.json", "model.safetensors"])
def test_a_model_file_that_is_a_device_or_fifo_is_refused(tmp_path: Path, name: str) -> None:
    save_model(TransformerLM(LMConfig(**LM)), tmp_path)
    (tmp_path / name).unlink()
    (tmp_path / name).symlink_to("/dev/zero")
    with pytest.raises(ValueError, match=rf"{name} is a character device; expected a regular file"):
        load_model(tmp_path)
    (tmp_path / name).unlink()
    os.mkfifo(tmp_path / name)
    with pytest.raises(ValueError, match=rf"{name} is a FIFO; expected a regular file"):
        load_model(tmp_path)


def test_the_weight_file_gets_the_same_permissions_as_the_config(tmp_path: Path) -> None:
    save_model(TransformerLM(LMConfig(**LM)), tmp_path)
    weights, config = (tmp_path / name for name in ("model.safetensors", "config.json"))
    assert oct(weights.stat().st_mode & 0o777) == oct(config.stat().st_mode & 0o777)
