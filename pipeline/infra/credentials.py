"""Credentials in URIs: masked in everything the project writes or prints, sent as a login.

A password can reach the project inside a URI: the tracking store's (`tracking.uri` or
MLFLOW_TRACKING_URI, e.g. `postgresql+psycopg://user:PASSWORD@host/db` or
`http://user:PASSWORD@host:5000`) or a dataset mirror's (`https://user:PASSWORD@host/path/`).
`redact` masks it in any text. The project applies it where it writes or prints: MLflow params,
tags and run names (tracking.tracked_run), the run records runs/*.json (tracking.run_record), the
report and the comparison, Hydra's saved configs (callbacks.RedactSavedConfigs), every log record
(redact_log_records) and every one-line error (stage.run_stage, stage.run_command). A reader of a
run record finds the masked store again with tracking.recorded_store.

Imports no pipeline module, so every layer of the plumbing can use it.
"""

from __future__ import annotations

import base64
import logging
import re
import urllib.parse
import urllib.request
from collections.abc import Mapping
from typing import Any

MASK = "***"

# Characters that never occur unencoded in a URI, so a match stops at the URI's end even inside
# JSON, HTML or a Python list's repr. A backslash may: Hydra escapes ":", "=", "," and brackets
# in the overrides it saves and logs (`https\://user\:pw@host`).
_OUTSIDE = r"\s\"<>\[\]{}|^`"
# scheme://user:password@ . The password runs to the last "@" before the URI ends (not into the
# next "scheme://"): SQLAlchemy accepts an unencoded "/", "?" or "#" in a database password, and
# an unencoded "@" is masked too; but digits then "/" are a port and a path (host:5000/a@b). The
# lookbehind starts a match only at the start of a word, which keeps the scan linear on long runs
# of base64 (the report's embedded images).
_USERINFO = re.compile(
    rf"(?<![A-Za-z0-9+.-])(?P<head>[A-Za-z][A-Za-z0-9+.-]*\\?://[^{_OUTSIDE}:/?#@\\]*\\?:)"
    rf"(?P<secret>(?!\d*[/?#])(?:(?!://)[^{_OUTSIDE}])+)@"
)
# Query parameters that carry a secret, by the end of their name: ?password=, &access_token=,
# S3's X-Amz-Signature= and X-Amz-Security-Token=, Azure's sig=, api_key=, sslkey=.
_QUERY = re.compile(
    r"(?<=[?&;])(?P<head>[\w.-]*(?:password|passwd|pwd|secret|token|signature|credential|sig"
    r"|key|auth))(?P<eq>\\?=)(?P<secret>[^&#\s\"<>]+)",
    re.IGNORECASE,
)


def redact(text: str) -> str:
    """`text` with the password of every `scheme://user:password@` in it, and the value of every
    secret-bearing query parameter (`password=`, `token=`, `X-Amz-Signature=`, ...), replaced by
    `***`. The user, host and path stay, so the record still says which store or mirror it was.
    Idempotent; text without a URI is returned unchanged. A password holding a character that a
    URI does not allow (whitespace, `"<>[]{}|^` or a backtick) must be percent-encoded, as
    RFC 3986 and SQLAlchemy require: unencoded, it would end the match early."""
    text = _USERINFO.sub(rf"\g<head>{MASK}@", text)
    return _QUERY.sub(rf"\g<head>\g<eq>{MASK}", text)


def redacted(data: Any) -> Any:
    """A copy of `data` (nested dicts, lists and tuples) with every string passed through
    `redact`; other values as they are."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, Mapping):
        return {key: redacted(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(redacted(value) for value in data)
    return data


def is_masked(uri: str) -> bool:
    """True if `uri` is the output of `redact` with something masked: its password is lost."""
    return any(
        match["secret"] == MASK for match in (*_USERINFO.finditer(uri), *_QUERY.finditer(uri))
    )


def login_request(url: str, headers: Mapping[str, str] | None = None) -> urllib.request.Request:
    """A urllib request for `url` that sends its `user:password@`, if any, as HTTP Basic
    authentication (RFC 7617). urllib itself would look "user:password@host" up in DNS and fail
    with "Name or service not known". The header is not repeated after a redirect, so another
    host never sees the password."""
    parts = urllib.parse.urlsplit(url)
    userinfo, at, host = parts.netloc.rpartition("@")
    request = urllib.request.Request(
        urllib.parse.urlunsplit(parts._replace(netloc=host)), headers=dict(headers or {})
    )
    if at:
        user, _, password = userinfo.partition(":")
        login = f"{urllib.parse.unquote(user)}:{urllib.parse.unquote(password)}"
        token = base64.b64encode(login.encode()).decode("ascii")
        request.add_unredirected_header("Authorization", f"Basic {token}")
    return request


def _redact_record(record: logging.LogRecord) -> None:
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: leave it for the handler to report
        return
    if (clean := redact(message)) != message:
        record.msg, record.args = clean, ()
    if record.exc_info and record.exc_info[0] is not None:
        trace = logging.Formatter().formatException(record.exc_info)
        if (clean := redact(trace)) != trace:
            record.exc_text = clean  # formatters print exc_text instead of formatting again


def redact_log_records() -> None:
    """From now on, mask credentials (`redact`) in the message and traceback of every log record
    this process creates, whatever logger and handler it goes through. A record factory, not a
    handler filter: Hydra replaces the handlers for each job, the factory stays. Idempotent."""
    base = logging.getLogRecordFactory()
    if getattr(base, "redacts", False):
        return

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = base(*args, **kwargs)
        _redact_record(record)
        return record

    factory.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(factory)
