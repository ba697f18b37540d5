"""Which phrases of an answer to ground: scored by the keyword selector, listed by the LMM, or named by the
caller; and the selector's training targets from PNG narratives."""

from flmm_lightning.selection.named import (
    LMM_SELECTOR_PROMPT,
    SelectorReplyWarning,
    locate_given_phrases,
    parse_lmm_phrases,
)
from flmm_lightning.selection.phrases import (
    KEYWORD_THRESHOLD,
    AnswerPhrase,
    locate_phrase,
    phrases_from_scores,
    score_runs,
    snap_to_words,
    strip_span,
    token_char_offsets,
    token_span_of,
    word_spans,
)
from flmm_lightning.selection.targets import (
    every_word_baseline,
    narrative_phrase_spans,
    narrative_token_offsets,
    object_token_spans,
    selector_targets,
)

__all__ = [
    "KEYWORD_THRESHOLD",
    "LMM_SELECTOR_PROMPT",
    "AnswerPhrase",
    "SelectorReplyWarning",
    "every_word_baseline",
    "locate_given_phrases",
    "locate_phrase",
    "narrative_phrase_spans",
    "narrative_token_offsets",
    "object_token_spans",
    "parse_lmm_phrases",
    "phrases_from_scores",
    "score_runs",
    "selector_targets",
    "snap_to_words",
    "strip_span",
    "token_char_offsets",
    "token_span_of",
    "word_spans",
]
