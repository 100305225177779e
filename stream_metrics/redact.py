"""Hyperparameters made safe to store: secrets out, values flat and JSON-safe.

Redacted (SCHEMA section 3): any string value whose name ends with ``token``, ``secret``,
``password``, ``passwd``, ``api_key``, ``apikey``, ``access_key`` or ``private_key`` (any case,
starting the name or after its last ``_``, ``.``, ``-`` or ``/``); any string shaped like a known
credential (``hf_...``, ``sk-...``, a 40-hex W&B key, an AWS key id); and the user and password of
any URI, in any string value at all. ``include_num_input_tokens_seen="no"`` and
``pad_token="<pad>"`` are settings, not secrets, and stay readable.
"""
from __future__ import annotations

import enum
import math
import re

REDACTED = "<redacted>"
_SECRET_NAME = re.compile(r"(?:^|[_.\-/])(?:token|secret|password|passwd|api_?key|access_key|private_key)$",
                          re.IGNORECASE)
# A tokenizer's special tokens (transformers' SPECIAL_TOKENS_ATTRIBUTES) are text such as "<pad>",
# named like secrets: they are settings a reader needs.
_TOKENIZER_TOKENS = frozenset({"bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                               "mask_token"})
# Values shaped like credentials, whatever their name: Hugging Face and OpenAI-style keys, a W&B
# API key (40 hex digits, the whole value) and an AWS access key id.
_CREDENTIAL = re.compile(r"\bhf_[A-Za-z0-9]{20,}|\bsk-[A-Za-z0-9_\-]{20,}|^\s*[0-9a-fA-F]{40}\s*$"
                         r"|\b(?:AKIA|ASIA)[0-9A-Z]{16}\b")
# scheme://user:password@host  or  scheme://token@host
_URI_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<cred>[^/@\s]+)@")


def redact_uri(text: str) -> str:
    """``redact_uri("http://bob:pw@host:5000") == "http://<redacted>@host:5000"``."""
    return _URI_CREDENTIALS.sub(lambda m: m.group("scheme") + REDACTED + "@", text)


def is_secret_name(name: str) -> bool:
    """``is_secret_name("hub_token")`` is True; ``"pad_token"`` and ``"include_num_input_tokens_seen"`` are not."""
    last = re.split(r"[./]", str(name))[-1].lower()
    return bool(_SECRET_NAME.search(str(name))) and last not in _TOKENIZER_TOKENS


def is_credential(text: str) -> bool:
    """A value shaped like a known credential: ``is_credential("hf_" + "a" * 34)`` is True."""
    return bool(_CREDENTIAL.search(text))


def _secret_text(text: str, name: str) -> str:
    if text and (is_secret_name(name) or is_credential(text)):
        return REDACTED
    return redact_uri(text)


def _plain(value, name: str, depth: int):
    if isinstance(value, str):
        return _secret_text(value, name)
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
    return _secret_text(str(value), name)


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

        if dataclasses.is_dataclass(config) and not isinstance(config, type):
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
