"""``qkv bench``: time qkv's backends against PyTorch SDPA and the textbook code, side by side.

Modules: :mod:`~qkv.bench.cases` (feature cases, inputs, FLOPs, the peers), :mod:`~qkv.bench.runner`
(timing here, peak memory in fresh processes, skipping what would not fit) and :mod:`~qkv.bench.report`
(JSON, markdown, PNG). Example::

    from qkv.bench import BenchConfig, run_bench, markdown_table

    results = run_bench(BenchConfig(lengths=(256, 512), features=("plain", "causal"), memory=False))
    print(markdown_table(results))
"""

from qkv.bench.cases import DTYPES, FEATURES, MODES, PEERS, Case, attention_flops, naive_attention
from qkv.bench.report import markdown_table, write_outputs
from qkv.bench.runner import BenchConfig, Result, machine_info, run_bench

__all__ = [
    "DTYPES",
    "FEATURES",
    "MODES",
    "PEERS",
    "BenchConfig",
    "Case",
    "Result",
    "attention_flops",
    "machine_info",
    "markdown_table",
    "naive_attention",
    "run_bench",
    "write_outputs",
]
