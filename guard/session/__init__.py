"""One response under moderation: verdicts, debounce, release modes, redaction, the response session."""
