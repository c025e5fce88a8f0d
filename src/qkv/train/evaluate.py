"""Corpus scores of translations: BLEU and chrF with sacrebleu (and their signatures), exact match.

The sacrebleu signature (e.g. ``nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp|version:2.6.0``) records how
a score was computed, so scores are comparable only when their signatures are equal; reports always carry
it. Exact match is the share of hypotheses equal to their reference after stripping surrounding whitespace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Scores:
    """Scores of ``count`` hypotheses against one reference each (BLEU, chrF and exact match in percent)."""

    bleu: float
    chrf: float
    exact_match: float
    exact: int
    count: int
    bleu_signature: str
    chrf_signature: str
    bleu_detail: str
    chrf_name: str = "chrF2"

    def lines(self) -> list[str]:
        """Report lines in sacrebleu's form: ``BLEU|<signature> = 35.2 ...``, ``chrF2|<signature> = 61.0``,
        then ``exact match = ...``."""
        return [
            f"BLEU|{self.bleu_signature} = {self.bleu_detail}",
            f"{self.chrf_name}|{self.chrf_signature} = {self.chrf:.2f}",
            f"exact match = {self.exact_match:.2f}% ({self.exact}/{self.count})",
        ]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> tuple[float, int]:
    """``(percent, count)`` of hypotheses equal to their reference (surrounding whitespace ignored)."""
    _check(hypotheses, references)
    exact = sum(h.strip() == r.strip() for h, r in zip(hypotheses, references, strict=True))
    return (100.0 * exact / len(hypotheses) if hypotheses else 0.0), exact


def score(hypotheses: Sequence[str], references: Sequence[str]) -> Scores:
    """Corpus BLEU (13a tokenization, exponential smoothing), chrF2 and exact match, sacrebleu defaults."""
    from sacrebleu.metrics import BLEU, CHRF

    _check(hypotheses, references)
    if not hypotheses:
        raise ValueError("no hypotheses to score; expected at least one")
    bleu_metric, chrf_metric = BLEU(), CHRF()
    bleu = bleu_metric.corpus_score(list(hypotheses), [list(references)])
    chrf = chrf_metric.corpus_score(list(hypotheses), [list(references)])
    percent, exact = exact_match(hypotheses, references)
    return Scores(
        bleu=float(bleu.score),
        chrf=float(chrf.score),
        exact_match=percent,
        exact=exact,
        count=len(hypotheses),
        bleu_signature=str(bleu_metric.get_signature()),
        chrf_signature=str(chrf_metric.get_signature()),
        bleu_detail=str(bleu).split(" = ", 1)[1],
        chrf_name=chrf.name,
    )


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(
            f"{len(hypotheses)} hypotheses but {len(references)} references; expected one reference per hypothesis"
        )
