"""De-identification of personal identifiers before tokenization (own recognizers: Presidio needs a
spaCy model download, which these machines cannot do). See deidentifier.py and recognizers.py."""

from pagedserve.ops.deid.deidentifier import (
    DEID_MODES,
    Deidentifier,
    DeidMode,
    StreamRestorer,
    recognizers_for,
)
from pagedserve.ops.deid.recognizers import (
    Finding,
    Recognizer,
    cn_id_is_valid,
    find_identifiers,
    luhn_is_valid,
)

__all__ = [
    "DEID_MODES", "Deidentifier", "DeidMode", "Finding", "Recognizer", "StreamRestorer", "cn_id_is_valid",
    "find_identifiers", "luhn_is_valid", "recognizers_for",
]
