"""Hugging Face ViT weights loaded into :class:`~qkv.models.vit.VisionTransformer`.

:func:`hf_vit_to_qkv_state_dict` renames a ``ViTForImageClassification`` state dict, of current transformers
or of checkpoint files written by transformers 4 (the layout of the files on the Hub); the embeddings, the
final ``layernorm`` and the ``classifier`` keep their names::

    ViT  vit.layers.{i}. (transformers 5)  vit.encoder.layer.{i}. (files)   qkv  layers.{i}.
         attention.q_proj                  attention.attention.query             self_attn.q_proj
         attention.k_proj                  attention.attention.key               self_attn.k_proj
         attention.v_proj                  attention.attention.value             self_attn.v_proj
         attention.o_proj                  attention.output.dense                self_attn.out_proj
         layernorm_before                  layernorm_before                      norm1
         mlp.fc1                           intermediate.dense                    linear1
         mlp.fc2                           output.dense                          linear2
         layernorm_after                   layernorm_after                       norm2

:func:`load_hf_vit` builds the model from such weights: a directory with ``config.json`` and
``model.safetensors`` (e.g. google/vit-base-patch16-224's files), or a state dict and a config dict.
Pickled weights are refused, as :mod:`qkv.models.pretrained` refuses them. Nothing is downloaded.

Example::

    model = load_hf_vit("checkpoints/vit-base-patch16-224")  # eval mode
    out = model(pixel_values, need_attention=True)  # pixel_values (B, 3, 224, 224), normalized as ViT's
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from qkv.checks import short_repr
from qkv.models.pretrained import CONFIG_FILE, HF_ONLY_KEYS, PICKLE_FILES, WEIGHTS_FILE, load_renamed_weights
from qkv.models.vit import VisionTransformer, ViTConfig

# Inside a layer: ViT's module names (transformers 5, then the checkpoint files of transformers 4) → qkv's.
HF_VIT_LAYER_NAMES = {
    "attention.q_proj": "self_attn.q_proj",
    "attention.k_proj": "self_attn.k_proj",
    "attention.v_proj": "self_attn.v_proj",
    "attention.o_proj": "self_attn.out_proj",
    "mlp.fc1": "linear1",
    "mlp.fc2": "linear2",
    "attention.attention.query": "self_attn.q_proj",
    "attention.attention.key": "self_attn.k_proj",
    "attention.attention.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "intermediate.dense": "linear1",
    "output.dense": "linear2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
}
HF_VIT_LAYER_PREFIXES = ("layers.", "encoder.layer.")
# Kept as they are: the embeddings, the final LayerNorm, the classification head.
HF_VIT_SAME_PREFIXES: tuple[str, ...] = (
    "embeddings.cls_token",
    "embeddings.position_embeddings",
    "embeddings.patch_embeddings.",
    "layernorm.",
    "classifier.",
)
# In ViT checkpoints but not part of a classifier: ViTModel's pooler, ViTForMaskedImageModeling's mask token.
HF_VIT_IGNORED_PREFIXES = ("pooler.", "embeddings.mask_token")

# HF ViTConfig key → ViTConfig field (keys with the same name are taken as they are).
HF_VIT_CONFIG_NAMES = {
    "hidden_size": "d_model",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "ffn_dim",
    "hidden_dropout_prob": "dropout",
    "attention_probs_dropout_prob": "attention_dropout",
    "hidden_act": "activation",
}
HF_VIT_CONFIG_SAME = ("image_size", "patch_size", "num_channels", "layer_norm_eps", "qkv_bias")
# ViT keys that only matter to other heads (masked image modelling, the pooler): ignored.
HF_VIT_IGNORED_KEYS = frozenset({"encoder_stride", "pooler_output_size", "pooler_act"})
# Keys of PretrainedConfig that would change the architecture: the only value qkv's ViT computes (the default).
HF_VIT_SUPPORTED_VALUES: dict[str, Any] = {
    "is_encoder_decoder": False,
    "is_decoder": False,
    "add_cross_attention": False,
    "cross_attention_hidden_size": None,
    "pruned_heads": {},
}


def hf_vit_to_qkv_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``ViTForImageClassification`` (or ``vit.``-less ``ViTModel``) state dict to
    :class:`VisionTransformer`'s names; both transformers 5's names and the files' (transformers 4) work.

    The pooler and a mask token are dropped; any other unknown key is a ``ValueError`` naming it.
    """
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state_dict.items():
        key = name.removeprefix("vit.")
        if key.startswith(HF_VIT_IGNORED_PREFIXES):
            continue
        if key.startswith(HF_VIT_SAME_PREFIXES):
            out[key] = tensor
            continue
        renamed = _rename_vit_layer_key(key)
        if renamed is None:
            unknown.append(name)
        else:
            out[renamed] = tensor
    if unknown:
        raise ValueError(f"not ViTForImageClassification keys this model can take: {', '.join(unknown[:8])}")
    return out


def _rename_vit_layer_key(key: str) -> str | None:
    """``{layers.|encoder.layer.}{i}.{module}.{param}`` → ``layers.{i}.{qkv module}.{param}``, or ``None``."""
    for prefix in HF_VIT_LAYER_PREFIXES:
        if key.startswith(prefix):
            index, _, rest = key.removeprefix(prefix).partition(".")
            module, _, param = rest.rpartition(".")
            if index.isdigit() and module in HF_VIT_LAYER_NAMES:
                return f"layers.{index}.{HF_VIT_LAYER_NAMES[module]}.{param}"
    return None


def vit_config_from_hf(hf: Mapping[str, Any], where: str = "config") -> ViTConfig:
    """A :class:`ViTConfig` from the fields of Hugging Face's ``ViTConfig`` (a ``config.json`` dict).

    ``num_classes`` comes from ``num_labels`` or ``id2label``; ``id2label``'s names become ``class_names``
    unless they are transformers' placeholders (``LABEL_0``, ...). Missing keys take ViT's defaults.

    Raises:
        ValueError: not a ViT config, or keys qkv does not know (they might change the model), or bad values;
            the message starts with ``where``.
    """
    if not isinstance(hf, Mapping):
        raise TypeError(f"{where} must be a mapping (a ViT config.json); got {type(hf).__name__}")
    model_type = hf.get("model_type", "vit")
    if model_type != "vit":
        raise ValueError(f"{where}: model_type={model_type!r} is not supported; load_hf_vit takes 'vit' models")
    for key, supported in HF_VIT_SUPPORTED_VALUES.items():
        if key in hf and hf[key] != supported:
            raise ValueError(f"{where}: {key}={short_repr(hf[key])} is not supported; qkv's ViT computes {supported!r}")
    known = set(HF_VIT_CONFIG_NAMES) | set(HF_VIT_CONFIG_SAME) | HF_VIT_IGNORED_KEYS | HF_ONLY_KEYS
    known |= set(HF_VIT_SUPPORTED_VALUES)
    unknown = sorted(str(k) for k in hf if k not in known)
    if unknown:
        raise ValueError(
            f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; qkv cannot tell whether they change the "
            f"model. Known: {', '.join(sorted(HF_VIT_CONFIG_NAMES) + sorted(HF_VIT_CONFIG_SAME))} and Hugging Face "
            "bookkeeping keys"
        )
    fields = {ours: hf[theirs] for theirs, ours in HF_VIT_CONFIG_NAMES.items() if theirs in hf}
    fields.update({k: hf[k] for k in HF_VIT_CONFIG_SAME if k in hf})
    id2label = hf.get("id2label")
    if isinstance(id2label, Mapping) and id2label:
        try:
            labels = [str(id2label[k]) for k in sorted(id2label, key=int)]
        except (TypeError, ValueError):
            raise ValueError(
                f"{where}: id2label must map class ids (0, 1, ...) to names; got {short_repr(id2label)}"
            ) from None
        fields["num_classes"] = len(labels)
        if labels != [f"LABEL_{i}" for i in range(len(labels))]:
            fields["class_names"] = labels
    if "num_labels" in hf:
        fields["num_classes"] = hf["num_labels"]
    try:
        return ViTConfig.from_dict(fields)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def load_hf_vit(
    path_or_state_dict: str | Path | Mapping[str, torch.Tensor], config: Mapping[str, Any] | None = None
) -> VisionTransformer:
    """A :class:`VisionTransformer` with the weights of a Hugging Face ``ViTForImageClassification``.

    Args:
        path_or_state_dict: a checkpoint directory holding ``model.safetensors`` (and ``config.json`` unless
            ``config`` is given), e.g. google/vit-base-patch16-224's files; or the model's state dict.
        config: the Hugging Face ``ViTConfig`` fields (``model.config.to_dict()`` or a parsed ``config.json``);
            required with a state dict, instead of ``config.json`` with a directory.

    Returns:
        The model in eval mode. Pickled weights (``pytorch_model.bin``, ...) are refused: unpickling a file
        can run any code in it.

    Raises:
        ValueError: missing files, an unsupported config, unknown keys, missing weights or shape mismatches
            (the message names them).
    """
    if isinstance(path_or_state_dict, Mapping):
        if config is None:
            raise ValueError("load_hf_vit(state_dict) needs config: the Hugging Face ViT config as a dict")
        state, where = dict(path_or_state_dict), "state_dict"
        model_config = vit_config_from_hf(config)
    elif isinstance(path_or_state_dict, (str, Path)):
        directory = Path(path_or_state_dict)
        state, where = _read_hf_weights(directory), str(directory / WEIGHTS_FILE)
        model_config = vit_config_from_hf(_read_hf_config(directory) if config is None else config)
    else:
        raise TypeError(
            "path_or_state_dict must be a checkpoint directory or a state dict; got "
            f"{type(path_or_state_dict).__name__}"
        )
    try:
        renamed = hf_vit_to_qkv_state_dict(state)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return load_renamed_weights(
        VisionTransformer(model_config),
        renamed,
        where,
        config_name="the config",
        hint=" (a ViTForImageClassification checkpoint has them all)",
    )


def _read_hf_config(directory: Path) -> dict[str, Any]:
    path = directory / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path} is missing; a ViT checkpoint directory needs {CONFIG_FILE}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object; got a {type(data).__name__}")
    return data


def _read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    if not directory.is_dir():
        what = "a file, not a directory" if directory.exists() else "no such directory"
        raise ValueError(f"{directory} is not a checkpoint directory ({what})")
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        pickled = [name for name in PICKLE_FILES if (directory / name).is_file()]
        if pickled:
            raise ValueError(
                f"{directory} has {pickled[0]} but no {WEIGHTS_FILE}: qkv never unpickles weights (loading a "
                f"pickle can run arbitrary code); convert the checkpoint to {WEIGHTS_FILE} with a tool you trust"
            )
        raise ValueError(f"{weights} is missing; a checkpoint directory needs {WEIGHTS_FILE}")
    try:
        return load_file(str(weights))
    except SafetensorError as error:
        raise ValueError(f"{weights} is not a readable safetensors file: {error}") from None
