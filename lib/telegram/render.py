"""What the bot's messages look like (HTML parse mode): every text is escaped, a notification is
``<b>[kind]</b> text`` (a warning sign on the kinds that need a person), a report is its bold title, its table in a
monospace block, its facts and notes. Only this module writes markup."""

from __future__ import annotations

import html

from pricelevel.telegram.outbox import MAX_MESSAGE
from pricelevel.trading.reports import Report, aligned

#: The kinds that ask for a person's attention get a sign; the rest none (emoji sparingly).
ATTENTION = {"risk": "\u26a0\ufe0f ", "reconcile": "\u26a0\ufe0f ", "pipeline": "\u274c "}
#: Room left in a message for the title and notes when a report's table is cut.
_SPARE = 600


def escape(text: str) -> str:
    return html.escape(text, quote=False)


def notice_html(kind: str, text: str) -> str:
    """A notification: its kind in bold first, then the text (its first line is the headline)."""
    return f"{ATTENTION.get(kind, '')}<b>[{escape(kind)}]</b> {escape(text)}"


def report_html(report: Report) -> str:
    """A report in one message: a long table keeps its first rows (the newest, where rows are newest first) and says how many were left out."""
    lines = [f"<b>{escape(report.title)}</b>"]
    table = aligned(report.columns, report.rows)
    if table:
        kept, size = [], 0
        for line in table:
            size += len(escape(line)) + 1
            if size > MAX_MESSAGE - _SPARE:
                break
            kept.append(line)
        lines.append(f"<pre>{escape(chr(10).join(kept))}</pre>")
        if len(kept) < len(table):
            lines.append(f"<i>{len(table) - len(kept)} more rows not shown</i>")
    lines += [f"{escape(label)}: <code>{escape(value)}</code>" for label, value in report.facts]
    lines += [f"<i>{escape(note)}</i>" for note in report.notes]
    return "\n".join(lines)
