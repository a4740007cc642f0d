"""Redaction of secrets before anything is printed, logged, sent to MLflow or written to disk.

One place decides what a secret looks like, and every output path of vgen goes through it:

* `redact_uri(uri)`: the user-info part of a URI (``user:password@`` or ``token@``) becomes
  ``***@`` (unless it is only ``${VAR}`` references, the template a DAG file holds), and query
  values whose names look like credentials (``?token=...``,
  ``X-Amz-Signature=...``) become ``***``. Anything else is returned unchanged, so a URI without
  a secret (``sqlite:///...``, ``s3://bucket/x``) prints exactly as given.
* `redact_text(text)`: the same for every URI inside free text (an exception message, a log line).
* `is_secret_key(name)`: whether a mapping key names a credential (``password``,
  ``MLFLOW_TRACKING_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``api_key``, ``credentials``); ordinary
  model fields such as ``token_dim``, ``num_tokens``, ``key_map`` or ``keys`` do not.
* `redact_config(obj, env_substituted=None)`: a copy of a nested config (mappings, lists,
  strings) where string values under secret-looking keys are ``***`` (numbers are kept),
  every string goes through `redact_text`, and the values at the paths in ``env_substituted``
  (values that came from
  ``${VAR}`` substitutions in a DAG file, see :mod:`pipelines.dag.spec`) are replaced by their
  template as written in the file (``${MLFLOW_PASSWORD}``), so the record says where the value
  came from without containing it.

This module imports nothing outside the standard library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, urlencode

__all__ = ["MASK", "is_secret_key", "redact_config", "redact_text", "redact_uri"]

MASK = "***"

#: name segments that make a key a credential wherever they appear
_SECRET_SEGMENTS = frozenset(
    {"password", "passwd", "pwd", "passphrase", "secret", "secrets", "credential",
     "credentials", "creds", "authorization", "signature", "sig", "sas"}
)
#: a key whose last segment is "token" is a credential (session_token, hf_token, token); a
#: model field that starts with it (token_dim, token_bits) or counts them (num_tokens) is not
_TOKEN_SEGMENTS = frozenset({"token", "apitoken", "accesstoken", "authtoken", "sastoken"})
#: "key" is a credential after one of these segments (api_key, access_key, AWS_SECRET_ACCESS_KEY,
#: private_key, account_key) or written as one word (apikey, accesskey)
_KEY_QUALIFIERS = frozenset(
    {"api", "access", "secret", "private", "account", "auth", "client", "signing",
     "encryption", "master", "service"}
)
_KEY_WORDS = frozenset({"apikey", "accesskey", "secretkey", "privatekey", "accountkey"})

_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")
_SPLIT = re.compile(r"[^a-z0-9]+")

# scheme://userinfo@ : userinfo runs to the last '@' before the authority ends ('/', '?', '#')
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s]+)@")
# user-info made only of ${VAR} references (no :-default, which could be a literal secret)
_TEMPLATE_USERINFO = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*\}(:\$\{[A-Za-z_][A-Za-z0-9_]*\})?$")
_QUERY_URI = re.compile(r"\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>]*\?[^\s'\"<>#]*")


def _segments(name: str) -> list[str]:
    return [s for s in _SPLIT.split(_CAMEL.sub("_", str(name)).lower()) if s]


def is_secret_key(name: Any) -> bool:
    """True when a key names a credential (see the module docstring for the rule)."""
    segs = _segments(str(name))
    if not segs:
        return False
    if any(s in _SECRET_SEGMENTS for s in segs) or any(s in _KEY_WORDS for s in segs):
        return True
    if segs[-1] in _TOKEN_SEGMENTS:
        return True
    return any(s == "key" and i > 0 and segs[i - 1] in _KEY_QUALIFIERS for i, s in enumerate(segs))


def _redact_userinfo(match: re.Match[str]) -> str:
    if _TEMPLATE_USERINFO.match(match.group("userinfo")):
        return match.group(0)  # ${USER}:${PASSWORD}@ as written in a DAG: names, no values
    return f"{match.group('scheme')}{MASK}@"


def _redact_query(match: re.Match[str]) -> str:
    uri = match.group(0)
    base, _, query = uri.partition("?")
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs or not any(is_secret_key(k) for k, _ in pairs):
        return uri
    masked = [(k, MASK if is_secret_key(k) else v) for k, v in pairs]
    return f"{base}?{urlencode(masked, safe='*/:')}"


def redact_text(text: Any) -> str:
    """``text`` with the user-info and credential query values of every URI in it masked."""
    s = str(text)
    if "://" not in s:
        return s
    s = _USERINFO.sub(_redact_userinfo, s)
    if "?" in s:
        s = _QUERY_URI.sub(_redact_query, s)
    return s


def redact_uri(uri: Any) -> Any:
    """A URI safe to show: ``http://user:secret@host:5000/x`` -> ``http://***@host:5000/x``.

    None stays None; a URI without a secret is returned unchanged."""
    if uri is None:
        return None
    return redact_text(uri)


def _mask_all(obj: Any) -> Any:
    """Every string (or bytes) value in ``obj`` masked; numbers, booleans and None are kept (a
    metric named ``loss_per_token`` is not a credential, and its value cannot be one)."""
    if isinstance(obj, Mapping):
        return {k: _mask_all(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mask_all(v) for v in obj]
    if isinstance(obj, (str, bytes)) and obj:
        return MASK
    return obj


def redact_config(obj: Any, env_substituted: Mapping[tuple, str] | None = None,
                  _path: tuple = ()) -> Any:
    """A redacted copy of a nested config (see the module docstring).

    Args:
        obj: mappings, lists/tuples, strings and scalars (anything else goes through str()
            only when it is a string; other scalars are kept as they are).
        env_substituted: path -> template for values that came from ``${VAR}`` substitutions,
            e.g. ``{("tracking",): "http://${MLFLOW_USER}:${MLFLOW_PASSWORD}@host"}``.
    """
    subs = env_substituted or {}
    if _path in subs:
        return subs[_path]
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if (*_path, k) in subs:
                out[k] = subs[(*_path, k)]
            elif is_secret_key(k):
                out[k] = _mask_all(v)
            else:
                out[k] = redact_config(v, subs, _path + (k,))
        return out
    if isinstance(obj, (list, tuple)):
        items = [redact_config(v, subs, _path + (i,)) for i, v in enumerate(obj)]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, str):
        return redact_text(obj)
    return obj
