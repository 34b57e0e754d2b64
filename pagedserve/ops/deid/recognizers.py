"""Recognizers of personal identifiers in free text: a pattern, the group holding the value, and an
optional validator (checksum, calendar) that a candidate must pass.

Entity types and what finds them (in priority order: where two candidates overlap, the earlier
recognizer wins, then the longer match):

    EMAIL      local@domain.tld
    CN_ID      mainland-China resident ID: 6-digit area, YYYYMMDD birth date (a real date),
               3-digit sequence, ISO 7064 MOD 11-2 check character (0-9 or X)
    BANK_CARD  13-19 digits (single spaces or dashes between groups allowed), Luhn-valid
    MRN        medical record numbers: after a label (MRN, medical record no., 病历号, 住院号, 病案号)
               and every pattern the tenant configures
    DOB        a date after a birth-date label (DOB, date of birth, born, 出生日期, 生日)
    PHONE      mainland mobile (+86 optional), mainland landline 0AA(A)-NNNNNNN(N), +CC international,
               North-American (NNN) NNN-NNNN / NNN-NNN-NNNN
    NAME       after an honorific (Mr, Mrs, Ms, Dr, Prof) or a label (name:, patient:, 姓名, 联系人)
    ADDRESS    after a label (address:, 地址, 住址) up to the end of the line or clause, an English
               street address (number + capitalised words + street type), a Chinese 省/市 ... 路/街 ...号

Names and addresses without such a cue are not detected: that needs a statistical model (an NER
model cannot be downloaded here), so those two types are best-effort by design.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable
from dataclasses import dataclass

_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_ID_CHECK = "10X98765432"  # check character for (sum of weighted digits) mod 11


def cn_id_is_valid(value: str) -> bool:
    """An 18-character resident ID whose check character and birth date are right."""
    if len(value) != 18 or not value[:17].isdigit() or value[17] not in "0123456789Xx":
        return False
    total = sum(int(d) * w for d, w in zip(value[:17], _CN_ID_WEIGHTS))
    if _CN_ID_CHECK[total % 11] != value[17].upper():
        return False
    try:
        born = datetime.date(int(value[6:10]), int(value[10:12]), int(value[12:14]))
    except ValueError:
        return False
    return datetime.date(1900, 1, 1) <= born <= datetime.date.today()


def luhn_is_valid(value: str) -> bool:
    digits = [int(c) for c in value if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


@dataclass(slots=True, frozen=True)
class Recognizer:
    entity: str  # the placeholder type: <ENTITY_n>
    pattern: re.Pattern[str]
    group: int | str = 0  # the group that holds the value (the rest is context: a label)
    validate: Callable[[str], bool] | None = None


def _r(entity: str, pattern: str, group: int | str = 0, validate: Callable[[str], bool] | None = None,
       flags: int = 0) -> Recognizer:  # fmt: skip
    return Recognizer(entity, re.compile(pattern, flags), group, validate)


_MONTHS = r"(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Sept|Oct|Nov|Dec)[a-z]*\.?"
_DATE = (rf"(?:\d{{4}}[-/.年]\d{{1,2}}[-/.月]\d{{1,2}}日?|\d{{1,2}}[-/.]\d{{1,2}}[-/.]\d{{4}}"
         rf"|{_MONTHS} \d{{1,2}},? \d{{4}}|\d{{1,2}} {_MONTHS},? \d{{4}})")
_CAP = r"[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?"
_HAN = r"[\u4e00-\u9fff]"

EMAIL = _r("EMAIL", r"(?<![\w.%+-])[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}(?![\w-])")
CN_ID = _r("CN_ID", r"(?<![0-9A-Za-z])[1-9]\d{16}[0-9Xx](?![0-9A-Za-z])", validate=cn_id_is_valid)
BANK_CARD = _r("BANK_CARD", r"(?<![\d-])\d(?:[ -]?\d){12,18}(?![\d])", validate=luhn_is_valid)
MRN_DEFAULT = (
    _r("MRN", r"\b(?:MRN|medical[ -]record(?:[ -](?:number|no\.?|#))?)[ \t]*[:#]?[ \t]*([A-Z0-9][A-Z0-9-]{3,19})\b",
       1, flags=re.IGNORECASE),
    _r("MRN", r"(?:病历号|住院号|病案号)[ \t]*[:：]?[ \t]*([A-Za-z0-9][A-Za-z0-9-]{3,19})", 1),
)  # fmt: skip
DOB = _r("DOB", rf"(?:\b(?:DOB|D\.O\.B\.?|date of birth|birth ?date|born(?: on)?)[ \t]*[:：]?[ \t]*"
                rf"|(?:出生日期|出生年月日?|生日)[ \t]*[:：]?[ \t]*)({_DATE})", 1, flags=re.IGNORECASE)  # fmt: skip
PHONES = (
    _r("PHONE", r"(?<![\d+])(?:(?:\+|00)86[ -]?)?1[3-9]\d[ -]?\d{4}[ -]?\d{4}(?!\d)"),
    _r("PHONE", r"(?<!\d)0\d{2,3}-\d{7,8}(?!\d)"),
    _r("PHONE", r"(?<![\w+])\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{2,4}(?:[ .-]?\d{2,4}){1,3}(?!\d)"),
    _r("PHONE", r"(?<!\d)(?:\(\d{3}\)[ ]?|\d{3}[-.])\d{3}[-.]\d{4}(?!\d)"),
)
NAMES = (
    _r("NAME", rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?[ ]({_CAP}(?:[ ]{_CAP}){{0,2}})", 1),
    _r("NAME", rf"\b(?:[Pp]atient(?:[ ][Nn]ame)?|[Nn]ame|[Cc]ontact)[ \t]*[:：][ \t]*({_CAP}(?:[ ]{_CAP}){{0,2}})", 1),
    _r("NAME", rf"(?:姓名|患者姓名|联系人|病人)[ \t]*[:：][ \t]*({_HAN}(?:·?{_HAN}){{1,3}})", 1),
    _r("NAME", rf"姓名[ \t]*({_HAN}{{2,4}})(?!{_HAN})", 1),
)
ADDRESSES = (
    _r("ADDRESS", r"\b(?:[Hh]ome[ ])?[Aa]ddress[ \t]*[:：][ \t]*([^\n;]{4,120}?)[ \t]*(?=[\n;]|$)", 1),
    _r("ADDRESS", r"(?:家庭住址|住址|地址)[ \t]*[:：]?[ \t]*([^\s，,。；;]{4,60})", 1),
    _r("ADDRESS", rf"\b\d{{1,5}}[ ](?:{_CAP}[ ]){{1,3}}(?:Street|St|Road|Rd|Avenue|Ave|Boulevard|Blvd|Lane|Ln"
                  rf"|Drive|Dr|Way|Court|Ct|Place|Pl)\b\.?"),
    _r("ADDRESS", rf"{_HAN}{{2,8}}?(?:省|市|自治区){_HAN}[\u4e00-\u9fff0-9]{{0,30}}?(?:路|街|道|巷|弄)\d{{1,5}}号"),
)


def default_recognizers() -> list[Recognizer]:
    return [EMAIL, CN_ID, BANK_CARD, *MRN_DEFAULT, DOB, *PHONES, *NAMES, *ADDRESSES]


def mrn_recognizer(pattern: str) -> Recognizer:
    """A tenant's medical-record-number pattern: the group named `value` (else group 1, else the
    whole match) is replaced. ValueError for a pattern that does not compile."""
    try:
        compiled = re.compile(pattern)
    except re.error as e:
        raise ValueError(f"mrn pattern {pattern!r} does not compile: {e}") from None
    group: int | str = "value" if "value" in compiled.groupindex else (1 if compiled.groups else 0)
    return Recognizer("MRN", compiled, group)


@dataclass(slots=True, frozen=True)
class Finding:
    start: int
    end: int
    entity: str


def find_identifiers(text: str, recognizers: list[Recognizer]) -> list[Finding]:
    """Non-overlapping findings in text order: each candidate that passes its validator, kept
    unless it overlaps one kept before it (recognizers in priority order, longer matches first)."""
    spans: list[tuple[int, int, int, int, str]] = []  # (priority, -length, start, end, entity)
    for priority, rec in enumerate(recognizers):
        for m in rec.pattern.finditer(text):
            start, end = m.span(rec.group)
            if start < 0 or end <= start:
                continue
            value = text[start:end]
            if rec.validate is not None and not rec.validate(value):
                continue
            spans.append((priority, -(end - start), start, end, rec.entity))
    spans.sort()
    kept: list[Finding] = []
    for _, _, start, end, entity in spans:
        if all(end <= k.start or start >= k.end for k in kept):
            kept.append(Finding(start, end, entity))
    kept.sort(key=lambda f: f.start)
    return kept
