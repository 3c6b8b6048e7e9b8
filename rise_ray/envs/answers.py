"""Answer extraction and number canonicalisation shared by the environments.

Everything here is plain string work: model output is never evaluated (no eval/exec), so a
hostile or garbled reply can at worst fail to parse.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")
MAX_NUMBER_CHARS = 200  # longer "numbers" are refused, so a huge reply cannot cost big-int time


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} (braces matched, \\{ \\} skipped), or None.

    `\\boxed 5` (no braces) gives the token after the space. The last box is the one that counts:
    if it is cut off (unbalanced braces, e.g. a truncated reply) the answer is None, not an
    earlier, intermediate box.
    """
    if not isinstance(text, str):
        return None
    starts = [m.end() for m in _BOX_RE.finditer(text)]
    if not starts:
        return None
    i = starts[-1]
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    if i >= n:
        return None
    if text[i] != "{":
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    depth = 0
    j = i
    while j < n:
        ch = text[j]
        if ch == "\\":
            j += 2  # an escaped character (\{, \}, \\) never opens or closes a group
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
        j += 1
    return None


_WRAPPERS = re.compile(r"\\(?:text|textbf|mathrm|mbox|mathbf)\{([^{}]*)\}")
_FRAC = re.compile(r"^\\[dt]?frac\{([^{}]+)\}\{([^{}]+)\}$")
_FRAC_SHORT = re.compile(r"^\\[dt]?frac(\d)(\d)$")  # \frac34
_DEC = re.compile(r"^(\d+)(?:\.(\d*))?$|^\.(\d+)$")
_THOUSANDS = re.compile(r"^\d{1,3}(?:,\d{3})+(?:\.\d*)?$")


def _unsigned(s: str) -> Fraction | None:
    """An unsigned decimal (thousands commas allowed when well formed) as an exact Fraction."""
    if "," in s:
        if not _THOUSANDS.match(s):
            return None
        s = s.replace(",", "")
    m = _DEC.match(s)
    if not m:
        return None
    whole, frac, bare = m.group(1) or "0", m.group(2) or "", m.group(3) or ""
    digits = frac or bare
    return Fraction(int(whole + digits), 10 ** len(digits)) if digits else Fraction(int(whole))


def _signed(s: str) -> Fraction | None:
    neg = s[:1] == "-"
    v = _unsigned(s[1:] if s[:1] in ("+", "-") else s)
    return None if v is None else (-v if neg else v)


def parse_number(s: str) -> Fraction | None:
    """The exact value of a number written as in a GSM8K/MATH answer, or None if it is not one.

    Tolerates "1,000", "$5", "5.00", "5.", "50%", "+3", "-\\frac{3}{4}", "3/4", LaTeX spacing and
    a trailing full stop; refuses anything else (words, expressions, exponents).
    """
    if not isinstance(s, str) or len(s) > MAX_NUMBER_CHARS:
        return None
    t = s.strip()
    t = _WRAPPERS.sub(r"\1", t)
    for a, b in (("\\$", ""), ("$", ""), ("\\%", ""), ("%", ""), ("{,}", ","), ("\\!", ""), ("\\,", ""),
                 ("\\;", ""), ("\\ ", ""), ("~", ""), ("\u2212", "-"), ("\\left", ""), ("\\right", "")):
        t = t.replace(a, b)
    if re.search(r",\s", t):  # "2, 500" is a list of two answers, not 2500
        return None
    t = re.sub(r"\s+", "", t).rstrip(".")
    if t.startswith("{") and t.endswith("}") and t.count("{") == 1:
        t = t[1:-1]
    if not t:
        return None
    neg = t[:1] == "-"
    if t[:1] in ("+", "-"):
        t = t[1:]
    m = _FRAC.match(t) or _FRAC_SHORT.match(t)
    if m:
        num, den = _signed(m.group(1)), _signed(m.group(2))
    elif t.count("/") == 1:
        num, den = (_signed(p) for p in t.split("/"))
    else:
        num, den = _unsigned(t), Fraction(1)
    if num is None or den is None or den == 0:
        return None
    v = num / den
    return -v if neg else v


def format_number(v: Fraction) -> str:
    """Canonical text of an exact number: "1000", "-2.5", "1/3" (decimals when they terminate)."""
    if v.denominator == 1:
        return str(v.numerator)
    d, k2, k5 = v.denominator, 0, 0
    while d % 2 == 0:
        d, k2 = d // 2, k2 + 1
    while d % 5 == 0:
        d, k5 = d // 5, k5 + 1
    if d != 1:
        return f"{v.numerator}/{v.denominator}"
    k = max(k2, k5)
    scaled = abs(v.numerator) * 10**k // v.denominator
    digits = str(scaled).rjust(k + 1, "0")
    return f"{'-' if v < 0 else ''}{digits[:-k]}.{digits[-k:]}"


def normalize_number(s: str) -> str | None:
    """Canonical string of a number (see parse_number, format_number), or None if not a number."""
    v = parse_number(s)
    return None if v is None else format_number(v)
