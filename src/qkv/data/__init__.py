"""Data for translation and language modelling: built-in corpora, the user's parallel or running text
(:mod:`qkv.data.text`), tokenizers and batching.

``qkv.data`` sits beside ``qkv.models`` and imports neither it nor ``qkv.train`` or ``qkv.cli``. The
optional libraries (num2words, babel, sentencepiece: the ``data`` extra) are imported only when used.

    corpus = generate_corpus("numbers", 2000, seed=0)          # train / valid / test, no overlap
    src_tok = CharTokenizer.train(src for src, _ in corpus.train)
    tgt_tok = CharTokenizer.train(tgt for _, tgt in corpus.train)
    batcher = TokenBatcher(encode_pairs(corpus.train, src_tok, tgt_tok), max_tokens=2048, seed=0)
    for batch in batcher:                                       # one epoch
        batch.src, batch.src_lengths, batch.tgt_in, batch.tgt_out
"""

from qkv.data.batching import (
    Batch,
    BatchPosition,
    SequentialBatcher,
    TokenBatcher,
    collate,
    padded_tokens,
    restore_order,
)
from qkv.data.corpus import (
    CORPORA,
    SPLITS,
    Corpus,
    CorpusStats,
    generate_corpus,
    split_paths,
    write_corpus,
)
from qkv.data.parallel import (
    DataError,
    LengthStats,
    LoadReport,
    filter_pairs,
    length_stats,
    load_parallel,
    load_tsv,
    read_lines,
)
from qkv.data.text import (
    BUILTIN_TEXTS,
    RandomBlocks,
    builtin_text,
    read_texts,
    score_windows,
    split_text,
    token_stream,
)
from qkv.data.tokenizer import (
    BOS_ID,
    EOS_ID,
    PAD_ID,
    SPECIAL_TOKENS,
    TOKENIZERS,
    UNK_ID,
    ByteTokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    WordTokenizer,
    encode_pairs,
    load_tokenizer,
    train_tokenizer,
)

__all__ = [
    "BOS_ID",
    "BUILTIN_TEXTS",
    "CORPORA",
    "EOS_ID",
    "PAD_ID",
    "RandomBlocks",
    "SPECIAL_TOKENS",
    "SPLITS",
    "TOKENIZERS",
    "UNK_ID",
    "Batch",
    "BatchPosition",
    "ByteTokenizer",
    "CharTokenizer",
    "Corpus",
    "CorpusStats",
    "DataError",
    "LengthStats",
    "LoadReport",
    "SentencePieceTokenizer",
    "SequentialBatcher",
    "TokenBatcher",
    "Tokenizer",
    "WordTokenizer",
    "builtin_text",
    "collate",
    "encode_pairs",
    "filter_pairs",
    "generate_corpus",
    "length_stats",
    "load_parallel",
    "load_tokenizer",
    "load_tsv",
    "padded_tokens",
    "read_lines",
    "read_texts",
    "restore_order",
    "score_windows",
    "split_paths",
    "split_text",
    "token_stream",
    "train_tokenizer",
    "write_corpus",
]
