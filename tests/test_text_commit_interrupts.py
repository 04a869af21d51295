"""Text without piece boundaries still interrupts mid-stream through the real stream engine.

Before forced cuts, a run of letters (or Chinese, Thai, emoji, one long identifier) was one
pre-tokenizer piece that was never released until the stream ended, so a policy could not fire
while the text was being generated. Every test uses a policy that flags every token, so the
only question is when the tokens reach the engine.
"""

from __future__ import annotations

import pytest
from test_incremental_tokenizer import UNBROKEN

from guard.policy.rules import Policy
from guard.text.incremental_tokenizer import IncrementalTokenizer

FLAG_EVERYTHING = Policy(name="flag-everything", unsafe_threshold=0.0, debounce=2)
DELTA = 8  # characters per text delta, like a streaming generator's few tokens


def chars_until_flagged(runtime, text: str, delta: int = DELTA) -> int | None:
    """Feed ``text`` in deltas; the number of characters fed when the flag fired (None: never)."""
    stream = runtime.moderator.open(messages=[{"role": "user", "content": "Write it out."}], policy=FLAG_EVERYTHING)
    try:
        for start in range(0, len(text), delta):
            verdict = stream.feed_text(text[start : start + delta]).result(timeout=60)
            if verdict.flag_index is not None:
                return start + len(text[start : start + delta])
        return None
    finally:
        stream.close()


@pytest.mark.parametrize("name", sorted(UNBROKEN))
def test_unbroken_run_interrupts_before_the_text_ends(demo_runtime, name):
    text = UNBROKEN[name][:3000]
    bound = IncrementalTokenizer(demo_runtime.tokenizer.hf).max_pending_chars
    fed = chars_until_flagged(demo_runtime, text)
    assert fed is not None, "the flag only fired at end_text()"
    assert fed <= bound + 2 * DELTA  # within one held-back bound, not at the end of the run


def test_ordinary_text_still_flags_at_the_first_stable_pieces(demo_runtime):
    words = ["Sure,", " here", " is", " the", " answer", " you", " asked", " for."]
    # "Sure," is two tokens; it is released once two more pieces follow it (" here", and the
    # space that will start the next word), exactly as before forced cuts existed.
    fed = chars_until_flagged(demo_runtime, "".join(words), delta=1)
    assert fed == len("Sure, here ")
