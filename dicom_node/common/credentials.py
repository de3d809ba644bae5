"""HTTP credentials read from a file or an environment variable, never from the config.

A configuration file is copied, versioned and shown to colleagues; a password in it leaks
with it. So ``[[destinations]]`` of type ``dicomweb`` and ``[status]`` only *name* where
their secret is: ``credentials_file`` (a file readable by the node's user) or
``credentials_env`` (an environment variable). For ``auth = "basic"`` the secret is
``user:password``; for ``auth = "bearer"`` it is the token itself. Surrounding whitespace
(the newline an editor adds) is ignored.

A secret that cannot be read is a configuration mistake: :class:`CredentialsError` is a
:class:`~dicom_node.config.ConfigError`, one sentence naming the setting, never the secret.
"""

from __future__ import annotations

import base64
import hmac
import os
from dataclasses import dataclass
from pathlib import Path

from dicom_node.config import ConfigError

__all__ = ["AUTH_KINDS", "Credentials", "CredentialsError", "read_credentials"]

#: Values of the ``auth`` settings.
AUTH_KINDS = ("none", "basic", "bearer")


class CredentialsError(ConfigError):
    """A secret named by the configuration cannot be read or has the wrong form."""


@dataclass(frozen=True)
class Credentials:
    """One secret: ``basic`` (user and password) or ``bearer`` (a token)."""

    kind: str
    user: str = ""
    secret: str = ""

    def __repr__(self) -> str:  # never print the secret in a log line or a traceback
        return f"Credentials(kind={self.kind!r}, user={self.user!r})"

    def authorization(self) -> str:
        """The value of an HTTP ``Authorization`` header (RFC 7617, RFC 6750)."""
        if self.kind == "basic":
            raw = f"{self.user}:{self.secret}".encode()
            return "Basic " + base64.b64encode(raw).decode("ascii")
        return f"Bearer {self.secret}"

    def accepts(self, header: str | None) -> bool:
        """Whether an ``Authorization`` header a client sent carries this secret.

        Compared in constant time, so response times tell nothing about the secret.
        """
        return header is not None and hmac.compare_digest(
            header.strip().encode(), self.authorization().encode()
        )


def read_credentials(auth: str, file: Path | None, env: str, key: str) -> Credentials | None:
    """The secret that ``key`` (e.g. ``destinations[1]``) names, or ``None`` for no auth.

    Raises :class:`CredentialsError` when the file or variable is missing, unreadable or
    empty, or a basic secret has no ``user:password`` form.
    """
    if auth == "none":
        return None
    if auth not in AUTH_KINDS:
        raise CredentialsError(f"{key}.auth: must be one of {', '.join(AUTH_KINDS)}")
    if file is not None:
        try:
            text = Path(file).read_text(encoding="utf-8")
        except OSError as exc:
            raise CredentialsError(
                f"{key}.credentials_file: {file} cannot be read ({exc.strerror or exc})"
            ) from None
        where = f"{key}.credentials_file ({file})"
    elif env:
        if env not in os.environ:
            raise CredentialsError(f"{key}.credentials_env: the variable {env} is not set")
        text = os.environ[env]
        where = f"{key}.credentials_env ({env})"
    else:
        raise CredentialsError(f"{key}: auth = {auth!r} needs credentials_file or credentials_env")
    text = text.strip()
    if not text:
        raise CredentialsError(f"{where} is empty")
    if auth == "bearer":
        return Credentials("bearer", secret=text)
    user, sep, password = text.partition(":")
    if not sep or not user:
        raise CredentialsError(f"{where} must hold user:password for basic authentication")
    return Credentials("basic", user=user, secret=password)
