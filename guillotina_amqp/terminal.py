"""Text on its way to an operator's terminal, made safe: what messages say is shown, not obeyed.

Ids, function names, progress lines and refusal reasons come from messages anyone who can
publish to the broker may have written. A terminal acts on control characters instead of
showing them (ESC starts the sequences that recolour, retitle or clear it), and bidi
overrides reorder what is shown; both are written as their escapes here.
"""

import logging
import unicodedata

#: C0/C1 controls, format characters (bidi overrides), line and paragraph separators
UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})


def terminal_safe(text: str, keep: str = "") -> str:
    """`text` with every character a terminal would act on written as its escape (\\x1b, \\n,
    \\u202e), but those in `keep`."""
    return "".join(
        char.encode("unicode_escape").decode("ascii")
        if unicodedata.category(char) in UNSAFE_CATEGORIES and char not in keep
        else char
        for char in text
    )


class TerminalSafeFormatter(logging.Formatter):
    """Formats a record as `inner` does, then escapes what a terminal would act on; newlines
    and tabs stay (a traceback keeps its lines)."""

    def __init__(self, inner: logging.Formatter | None = None) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()

    def format(self, record: logging.LogRecord) -> str:
        return terminal_safe(self.inner.format(record), keep="\n\t")


def escape_log_output() -> None:
    """Make every stream handler of the logging configuration (the console, log files) escape
    what it writes; once per handler."""
    for handler in logging.getLogger().handlers + logging.getLogger("guillotina_amqp").handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(
            handler.formatter, TerminalSafeFormatter
        ):
            handler.setFormatter(TerminalSafeFormatter(handler.formatter))
