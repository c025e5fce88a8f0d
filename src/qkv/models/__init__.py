"""Assembled models and decoding."""

from qkv.models.checkpoint import load_model, save_model
from qkv.models.config import EncoderConfig, LMConfig, TransformerConfig
from qkv.models.encoder import EncoderModelOutput, TransformerEncoder, mean_pool
from qkv.models.hypothesis import Hypothesis, gnmt_length_penalty
from qkv.models.lm import LMState, TransformerLM, sample_next
from qkv.models.rnn import RNNConfig, RNNDecoderState, RNNSeq2Seq
from qkv.models.search import beam_search, greedy_search
from qkv.models.text_to_image import Generation, TextToImageConfig, TextToImageModel
from qkv.models.transformer import TransformerDecoderState, TransformerSeq2Seq
from qkv.models.vit import VisionTransformer, ViTConfig, ViTOutput
from qkv.models.vit_hf import load_hf_vit

__all__ = [
    "EncoderConfig",
    "EncoderModelOutput",
    "Generation",
    "Hypothesis",
    "LMConfig",
    "LMState",
    "RNNConfig",
    "RNNDecoderState",
    "RNNSeq2Seq",
    "TextToImageConfig",
    "TextToImageModel",
    "TransformerConfig",
    "TransformerDecoderState",
    "TransformerEncoder",
    "TransformerLM",
    "TransformerSeq2Seq",
    "ViTConfig",
    "ViTOutput",
    "VisionTransformer",
    "beam_search",
    "gnmt_length_penalty",
    "greedy_search",
    "load_hf_vit",
    "load_model",
    "mean_pool",
    "sample_next",
    "save_model",
]
