"""Hyperparameters made safe to store: secrets out, values flat and JSON-safe.

Redacted (SCHEMA section 3): any string value whose name contains ``token``, ``secret``,
``password``, ``passwd`` or ``api_key`` (any case), and the user and password of any URI, in any
string value at all.
"""
from __future__ import annotations

import enum
import math
import re

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"token|secret|password|passwd|api_key|apikey", re.IGNORECASE)
# scheme://user:password@host  or  scheme://token@host
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<cred>[^/@\s]+)@")


def redact_uri(text: str) -> str:
    """``redact_uri("http://bob:pw@host:5000") == "http://<redacted>@host:5000"``."""
    return _URI_CREDENTIALS.sub(lambda m: m.group("scheme") + REDACTED + "@", text)


def is_secret_name(name: str) -> bool:
    return bool(_SECRET_NAME.search(str(name)))


def _plain(value, name: str, depth: int):
    if isinstance(value, str):
        return REDACTED if is_secret_name(name) and value else redact_uri(value)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, enum.Enum):
        return _plain(value.value, name, depth)
    if isinstance(value, dict) and depth < 4:
        return {str(k): _plain(v, f"{name}.{k}", depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)) and depth < 4:
        return [_plain(v, name, depth + 1) for v in value]
    text = redact_uri(str(value))
    return REDACTED if is_secret_name(name) and text else text


def redact_config(config) -> dict:
    """A JSON-safe copy of ``config`` (a dict, dataclass or object with ``to_dict``) with secrets out.

    >>> redact_config({"hub_token": "hf_abc", "uri": "http://u:p@h", "lr": 0.1})
    {'hub_token': '<redacted>', 'uri': 'http://<redacted>@h', 'lr': 0.1}
    """
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    elif not isinstance(config, dict):
        import dataclasses

        if dataclasses.is_dataclass(config):
            config = dataclasses.asdict(config)
        else:
            config = dict(vars(config))
    return {str(k): _plain(v, str(k), 0) for k, v in config.items()}


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """Nested config as MLflow params: ``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``."""
    out = {}
    for key, value in config.items():
        name = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            out.update(flat_params(value, name))
        else:
            out[name] = str(value)
    return out
