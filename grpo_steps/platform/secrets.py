"""Keep secrets out of logs, MLflow params and artifacts.

`redact_secrets` masks the value of every key that names a secret (token, secret, password, api key,
credential, ...) and the user:password part of URLs anywhere in the values; use it on any dict of settings
before it is logged. Keys that merely contain such a word (`max_prompt_tokens`, `tokenizer`) are kept.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"

# Matched against the key split into words (snake_case, kebab-case, dotted and camelCase keys alike).
_SECRET_WORDS = re.compile(
    r"(?:^|_)(?:token|secret|secrets|password|passwd|pwd|passphrase|credential|credentials|api_?key|apikey"
    r"|access_?key|private_?key|secret_?key|auth)(?:_|$)"
)
# scheme://userinfo@host: the userinfo (user, or user:password) is masked as a whole.
_URL_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)(?P<userinfo>[^/?#@\s]+)@")


def is_secret_key(key: str) -> bool:
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", str(key)).lower()
    words = re.sub(r"[^a-z0-9]+", "_", words)
    return bool(_SECRET_WORDS.search(words))


def redact_url(text: str) -> str:
    """`http://user:pass@host/x` -> `http://***@host/x`; other text unchanged."""
    return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{MASK}@", text)


def redact_secrets(d: dict[str, Any]) -> dict[str, Any]:
    """A copy of `d` (nested dicts and lists too) with secret values masked; `d` is not modified.

    A secret key's value becomes "***" unless it is empty (None or ""), which is kept so a missing
    secret stays visible; URL credentials are masked in every string value.
    """
    return {k: _redact_value(v, secret=is_secret_key(k)) for k, v in d.items()}


def _redact_value(v: Any, secret: bool) -> Any:
    if secret and v not in (None, ""):
        return MASK
    if isinstance(v, dict):
        return redact_secrets(v)
    if isinstance(v, list | tuple):
        return type(v)(_redact_value(x, secret=False) for x in v)
    if isinstance(v, str):
        return redact_url(v)
    return v
