"""Scores of free-text answers against a reference: exact match and ROUGE-L.

* :func:`normalize_answer` -- SQuAD-style: lowercase, drop punctuation and the articles a/an/the, squeeze
  whitespace; :func:`exact_match` compares normalised strings (1.0 or 0.0).
* :func:`rouge_l` -- ROUGE-L from the longest common subsequence of the two token sequences, with the
  tokenisation of Google's ``rouge_score`` (lowercase, every run of ``[a-z0-9]`` is a token, no stemming):
  precision ``LCS / len(candidate)``, recall ``LCS / len(reference)``, F1 their harmonic mean
  (``rouge_score``'s ``fmeasure``, what the probabilistic-evaluation paper's demo scores); 0 when either
  side has no token.
* :func:`extract_final_number` -- the final number of a worked math answer (GSM8K: after the last ``####``,
  else after the last "answer is", else the last number), :func:`number_match` -- exact match of that number
  with a reference number (:func:`canonical_number`: no thousands separators, no trailing zeros).
"""
from __future__ import annotations

import re
import string

SCORES = ("rouge_l", "rouge_l_recall", "exact_match")
_PUNCT = set(string.punctuation)


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match(candidate: str, reference: str) -> float:
    return float(normalize_answer(candidate) == normalize_answer(reference))


def tokens(s: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", s.lower())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) dynamic programme, one row kept)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> dict[str, float]:
    """``{"precision", "recall", "fmeasure"}`` of ROUGE-L."""
    c, r = tokens(candidate), tokens(reference)
    lcs = lcs_length(c, r)
    if lcs == 0:
        return {"precision": 0.0, "recall": 0.0, "fmeasure": 0.0}
    p, rec = lcs / len(c), lcs / len(r)
    return {"precision": p, "recall": rec, "fmeasure": 2 * p * rec / (p + rec)}


def score_text(candidate: str, reference: str, score: str) -> float:
    """One score in [0, 1]: ``rouge_l`` (F1), ``rouge_l_recall`` or ``exact_match``."""
    if score == "exact_match":
        return exact_match(candidate, reference)
    if score == "rouge_l":
        return rouge_l(candidate, reference)["fmeasure"]
    if score == "rouge_l_recall":
        return rouge_l(candidate, reference)["recall"]
    raise ValueError(f"unknown eval.prob.generate.score '{score}'; valid choices: {', '.join(SCORES)}")


# --- the final number of a math answer (GSM8K) ------------------------------------------------------------------
_NUM = r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)"
_NUMBER = re.compile(_NUM)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)\s*[:=]?\s*\$?\s*(" + _NUM + ")", re.IGNORECASE)


def canonical_number(s: str | None) -> str | None:
    """A number string without thousands separators, sign ``+``, trailing zeros or a trailing point
    (``"1,234.50"`` -> ``"1234.5"``, ``"72.0"`` -> ``"72"``); None when ``s`` is not a number."""
    from decimal import Decimal, InvalidOperation

    if s is None:
        return None
    try:
        x = Decimal(str(s).replace(",", "").replace("$", "").strip().lstrip("+"))
    except InvalidOperation:
        return None
    if not x.is_finite():
        return None
    if x == x.to_integral_value():
        return str(int(x))
    return format(x.normalize(), "f")


def extract_final_number(text: str) -> str | None:
    """The final answer of a worked math solution, as :func:`canonical_number`: the first number after the last
    ``####`` (GSM8K's answer line), else the number after the last "answer is" / "answer:", else the last
    number in the text; None when the text has no number."""
    if not text:
        return None
    if "####" in text:
        hit = _NUMBER.search(text.rsplit("####", 1)[1])
        if hit:
            return canonical_number(hit.group())
    said = list(_ANSWER_IS.finditer(text))
    if said:
        return canonical_number(said[-1].group(1))
    numbers = _NUMBER.findall(text)
    return canonical_number(numbers[-1]) if numbers else None


def number_match(candidate: str, reference: str) -> float:
    """1.0 when the final number of ``candidate`` (:func:`extract_final_number`) equals the reference number."""
    got, want = extract_final_number(candidate), canonical_number(reference)
    return float(got is not None and got == want)
