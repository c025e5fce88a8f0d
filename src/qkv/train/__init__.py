"""Training, translating and evaluating seq2seq models.

``qkv.train`` sits above ``qkv.models`` and ``qkv.data`` and below ``qkv.cli``::

    config         the YAML configuration (data / model / training / output), validated
    schedule       warmup + inverse-sqrt / cosine / constant learning rates
    loss           label-smoothed cross-entropy, padding ignored
    checkpoint_io  atomic safetensors checkpoints, keep-last-k, best, averaging; never unpickles
    trainer        the loop: AdamW, clipping, accumulation, autocast, validation, early stopping, export
    ddp            multi-process data parallelism under torchrun
    evaluate       BLEU / chrF (sacrebleu, with signatures) and exact match
    translate      a model directory → translations (greedy or beam), with cross-attention

Modules are imported by name (``from qkv.train.trainer import train``) so that reading a config does not
import torch.
"""
