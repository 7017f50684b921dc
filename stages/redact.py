"""Credentials that ride inside URIs never leave the process in clear: ``http://user:pass@host`` (an MLflow
tracking URI, an S3 endpoint, a teacher server URL) and secret-looking query parameters
(``?token=...``, ``X-Amz-Signature=...``) are masked wherever the stage prints, logs or stores a URI:
error lines, warnings, log records (a filter on the CLI's handler), the JSON summary line, manifests,
MLflow params and tags. Values are never redacted where they are USED (the client still connects with them).
"""

from __future__ import annotations

import logging
import re

MASK = "***"
# scheme://userinfo@ : userinfo is everything up to the first '@' that comes before any '/', space or quote
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/\s@'\"<>]+)@")
_SECRET_PARAM = re.compile(
    r"(?i)(?P<key>[?&;](?:[\w.\-]*(?:token|secret|passw|pwd|signature|credential|apikey|api_key|access_key|sig|auth)"
    r"[\w.\-]*)=)(?P<value>[^&;\s'\"#<>]+)")


def redact(text: str) -> str:
    """``text`` with the userinfo of every URL in it and secret-looking query values masked."""
    if not isinstance(text, str) or ("@" not in text and "=" not in text):
        return text
    text = _USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    return _SECRET_PARAM.sub(lambda m: f"{m['key']}{MASK}", text)


def has_credentials(text: str) -> bool:
    return isinstance(text, str) and redact(text) != text


def redact_obj(obj):
    """``obj`` (JSON-like: dicts, lists, strings) with every string redacted; keys kept."""
    if isinstance(obj, str):
        return redact(obj)
    if isinstance(obj, dict):
        return {k: redact_obj(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact_obj(v) for v in obj]
    return obj


class RedactingFilter(logging.Filter):
    """A handler filter: the formatted message (and an exception's text) of every record, redacted."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a broken format string is the logger's problem, not ours
            return True
        clean = redact(msg)
        if clean != msg:
            record.msg, record.args = clean, ()
        if record.exc_info and record.exc_info[1] is not None:
            import traceback

            record.exc_text = redact("".join(traceback.format_exception(*record.exc_info)).rstrip())
        return True


def install_log_filter() -> None:
    """Redact every record that reaches a handler of the root logger (call after logging is configured)."""
    f = RedactingFilter()
    for h in logging.getLogger().handlers:
        if not any(isinstance(x, RedactingFilter) for x in h.filters):
            h.addFilter(f)
    logging.captureWarnings(True)  # warnings.warn(...) goes through the same handlers
