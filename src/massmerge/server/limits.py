"""The server's limits and batching knobs, each a ``massmerge serve`` flag, each default defined once here.

Why bounded everywhere: a server on a network meets clients it does not control. Every resource a request can
claim (body bytes, inputs, characters, queue room, time) has a ceiling, so one client cannot take the memory or
the model away from the others; past a ceiling the answer is a 4xx or 503 naming it, never a slow death.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from massmerge.errors import OptionError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
API_KEY_ENV = "MASSMERGE_API_KEY"  # the key from the environment: not in `ps` output or shell history


@dataclass(frozen=True)
class ServerLimits:
    """Batching, back-pressure and per-request limits (flag ``--max-batch-size`` for ``max_batch_size``...)."""

    max_batch_size: int = 128  # inputs in one model call (one routing window); a larger request runs alone
    max_wait_ms: float = 5.0  # how long a batch waits for more requests after its first
    max_queue: int = 2048  # inputs waiting; beyond it requests get 503 + Retry-After
    max_body_bytes: int = 8 * 1024 * 1024  # request body (base64 images count here)
    max_inputs: int = 64  # inputs in one request
    max_input_chars: int = 16384  # characters of one text input (the tokenizer truncates to the max length)
    request_timeout_s: float = 30.0  # a request unanswered after this gets 504 (a queued one is dropped)
    grace_s: float = 30.0  # on SIGTERM / SIGINT: how long in-flight requests may take before the exit

    def checked(self) -> ServerLimits:
        """Itself, or a one-line :class:`OptionError` naming the flag whose value is not positive."""
        for item in fields(self):
            value = getattr(self, item.name)
            lowest = 0 if item.name == "max_wait_ms" else 1e-9
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < lowest:
                raise OptionError(f"{flag(item.name)}: must be {'>= 0' if lowest == 0 else 'positive'} "
                                  f"(got {value!r})")
        return self


LIMIT_HELP = {
    "max_batch_size": "inputs answered in one model call (one routing window) across requests",
    "max_wait_ms": "how long a batch waits for more requests after its first",
    "max_queue": "inputs that may wait; beyond it requests get 503 with Retry-After",
    "max_body_bytes": "request body size (base64 images count here); larger bodies get 413",
    "max_inputs": "inputs in one request",
    "max_input_chars": "characters of one text input",
    "request_timeout_s": "seconds a request may wait and run; then 504",
    "grace_s": "on SIGTERM/SIGINT: seconds in-flight requests may take before the server exits",
}


def flag(field: str) -> str:
    """The command-line flag of a limit (``max_wait_ms`` -> ``--max-wait-ms``)."""
    return "--" + field.replace("_", "-")


def default(field: str) -> object:
    """A limit's default (for help texts)."""
    return ServerLimits.__dataclass_fields__[field].default


def api_key_from(value: str | None) -> str | None:
    """The API key: the flag's value, else ``$MASSMERGE_API_KEY``; an empty key is refused (it would let
    everyone in while looking protected)."""
    key = value if value is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise OptionError(f"--api-key: empty (also checked: ${API_KEY_ENV})")
    return key


__all__ = ["API_KEY_ENV", "DEFAULT_HOST", "DEFAULT_PORT", "LIMIT_HELP", "ServerLimits", "api_key_from", "default",
           "flag"]
