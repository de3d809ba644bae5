"""STOW-RS: results to a DICOMweb destination, under the outbox's rules.

A destination with ``type = "dicomweb"`` receives each result with one STOW-RS request
(PS3.18 10.5) through ``dicomweb-client``: one object per request, so that each
acknowledgement is journalled before the next object goes, exactly as with C-STORE. The
client's own retries are off: the outbox retries, with the destination's backoff and
attempt limit, and a restart resumes them.

Credentials (``auth = "basic"`` or ``"bearer"``) are read from ``credentials_file`` or
``credentials_env`` at every attempt, so a corrected file takes effect on the next retry
without a restart. TLS certificates are verified (``verify_tls``), against
``ca_certificates`` when given.

A failure is recorded as the server stated it: the HTTP status with its phrase, and, where
the STOW-RS response names the object, its Failure Reason (0008,1197) with its meaning.
A Label Map SEG refused with a Failure Reason that refuses its SOP class is sent again in
its binary form (:func:`dicom_node.export.transport.deliver`).
"""

from __future__ import annotations

import functools
import logging
import os
import re
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path

import pydicom
import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset

from dicom_node.common.credentials import Credentials, read_credentials
from dicom_node.common.network import is_loopback
from dicom_node.config import (
    ConfigError,
    Destination,
    Settings,
    check_auth,
    existing,
    one_of,
)
from dicom_node.export.transport import (
    OnAck,
    Outcome,
    Outgoing,
    SegChoice,
    deliver,
    status_meaning,
)

log = logging.getLogger("dicom_node.export.dicomweb")
# dicomweb-client wraps each request in ``retrying``, which logs every exception with its
# traceback even with retries off; the outbox logs each failure in one line already.
logging.getLogger("retrying").setLevel(logging.ERROR)

__all__ = ["DicomWebDestination", "StowTransport", "check_destination", "stow_batch"]

#: HTTP statuses that concern the request, not the object: the rest of the batch would
#: get the same answer, so it is not sent (and keeps its place in the outbox).
_WHOLE_BATCH = {401, 403, 404, 405, 407, 408, 429}


@dataclass(frozen=True)
class DicomWebDestination(Destination):
    """A destination that takes results by STOW-RS: ``url`` and its credentials."""

    type: str = "dicomweb"
    #: DICOMweb base URL (the STOW-RS service is ``url/studies``).
    url: str = ""
    #: "none", "basic" or "bearer"; the secret is read from ``credentials_file`` or the
    #: variable ``credentials_env``, never written here.
    auth: str = one_of("none", "basic", "bearer")
    credentials_file: Path | None = existing("file", None)
    credentials_env: str = ""
    #: Over https: verify the server's certificate (against ``ca_certificates`` when given,
    #: else the system's CAs).
    verify_tls: bool = True
    ca_certificates: Path | None = existing("file", None)

    def check(self, key: str, settings: Settings) -> None:
        super().check(key, settings)
        if _has_credentials(self.url):
            # the URL is not repeated: it holds a secret
            raise ConfigError(
                f"{key}.url: holds credentials (user:password@ or a token in the query); "
                "name them in credentials_file or credentials_env instead"
            )
        if not re.match(r"^https?://[^/\s]+", self.url):
            raise ConfigError(f"{key}.url: {self.url!r} is not an http:// or https:// URL")
        check_auth(self.auth, self.credentials_file, self.credentials_env, key)
        host = re.sub(r"^http://([^/:]+|\[[^]]+\]).*$", r"\1", self.url)
        if self.auth != "none" and self.url.startswith("http://") and not is_loopback(host):
            raise ConfigError(
                f"{key}.url: credentials would cross the network in clear text; use https://"
            )


#: Query parameters that carry a secret (OAuth's access_token, API keys, signed URLs).
_SECRET_PARAMETER = re.compile(
    r"(token|password|passwd|pwd|secret|api[-_]?key|key|auth|signature|sig)$", re.IGNORECASE
)


def _has_credentials(url: str) -> bool:
    """Whether ``url`` carries a secret: ``user:password@`` or a token in its query.

    A URL is logged, shown on the status pages and kept in the outbox's errors; a secret
    belongs in ``credentials_file`` or ``credentials_env``.
    """
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return False
    if "@" in parts.netloc:
        return True
    names = (name for name, _ in urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
    return any(_SECRET_PARAMETER.search(name) for name in names)


class StowTransport:
    """STOW-RS to one :class:`DicomWebDestination`, one object per request."""

    settings = DicomWebDestination
    protocol = "STOW-RS"

    def __init__(self, settings: Settings, destination: DicomWebDestination) -> None:
        check_destination(destination)  # unreadable credentials or CA: refuse to start
        self.destination = destination
        self.timeout = settings.limits.network_timeout

    def send(self, items: list[Outgoing], choice: SegChoice, on_ack: OnAck) -> dict[int, Outcome]:
        return stow_batch(self.destination, items, self.timeout, choice, on_ack)


def check_destination(destination: DicomWebDestination) -> None:
    """Raise :class:`~dicom_node.config.ConfigError` when the destination's credentials
    or CA bundle cannot be read: the node refuses to start rather than fail every send."""
    _credentials(destination)
    ca = destination.ca_certificates
    if ca is not None and not Path(ca).is_file():
        raise ConfigError(
            f"destination {destination.name}: ca_certificates {ca} is not a readable file"
        )


def _credentials(destination: DicomWebDestination) -> Credentials | None:
    return read_credentials(
        destination.auth,
        destination.credentials_file,
        destination.credentials_env,
        f"destination {destination.name}",
    )


def _client(
    destination: DicomWebDestination, timeout: float
) -> tuple[DICOMwebClient, requests.Session]:
    session = requests.Session()
    # requests lets REQUESTS_CA_BUNDLE override a session's ``verify`` (a CA bundle or
    # False) at every request; the destination's own settings must win, so the
    # environment is read here, once, for what it should still give: proxies and the
    # default CA bundle.
    session.trust_env = False
    session.proxies = requests.utils.get_environ_proxies(destination.url)
    if not destination.verify_tls:
        session.verify = False
    elif destination.ca_certificates is not None:
        session.verify = str(destination.ca_certificates)
    else:
        session.verify = (
            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
        )
    credentials = _credentials(destination)
    if credentials is not None:
        session.headers["Authorization"] = credentials.authorization()
    client = DICOMwebClient(destination.url, session=session, timeout=timeout)
    client.set_http_retry_params(retry=False)  # the outbox retries, with its own backoff
    return client, session


def _phrase(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return str(code)


def _response_dataset(response: requests.Response | None) -> Dataset | None:
    """The STOW-RS response body (PS3.18 10.5.3) when it is DICOM JSON; else ``None``."""
    if response is None or not response.content:
        return None
    kind = response.headers.get("Content-Type", "").split(";")[0].strip()
    if kind not in ("application/dicom+json", "application/json"):
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _failure_reason(answer: Dataset | None, sop_uid: str) -> int | None:
    """The Failure Reason the response gives for ``sop_uid``, or ``None``."""
    for item in getattr(answer, "FailedSOPSequence", None) or []:
        if str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid:
            return int(item.get("FailureReason", 0x0110))
    return None


def _referenced(answer: Dataset | None, sop_uid: str) -> bool:
    return any(
        str(item.get("ReferencedSOPInstanceUID", "")) == sop_uid
        for item in getattr(answer, "ReferencedSOPSequence", None) or []
    )


class _BatchFailed(Exception):
    """The request failed for a reason every other object of the batch would share."""


def _store(
    client: DICOMwebClient, destination: DicomWebDestination, path: Path, timeout: float
) -> Outcome:
    """One STOW-RS request for the object at ``path``; raises :class:`_BatchFailed` when
    the server cannot be reached or refuses the request itself (credentials, URL)."""
    ds = pydicom.dcmread(path)
    sop_uid = str(ds.SOPInstanceUID)
    name = f"{destination.name} ({destination.url})"
    try:
        answer = client.store_instances([ds], study_instance_uid=str(ds.StudyInstanceUID))
        code = 200
    except requests.exceptions.SSLError as exc:
        raise _BatchFailed(
            f"{name}: TLS failed, the server's certificate was not verified ({_reason(exc)})"
        ) from None
    except requests.exceptions.Timeout:
        raise _BatchFailed(f"{name} did not answer within {timeout:g} s") from None
    except requests.exceptions.ConnectionError as exc:
        raise _BatchFailed(f"{name} cannot be reached ({_reason(exc)})") from None
    except requests.exceptions.HTTPError as exc:
        response = exc.response
        code = response.status_code if response is not None else 0
        body = _response_dataset(response)
        said = f"{destination.name} answered HTTP {_phrase(code)}"
        if code in (401, 403, 407):
            how = (
                "no credentials were sent (auth = none)"
                if destination.auth == "none"
                else f"the {destination.auth} credentials from "
                + (
                    f"credentials_file {destination.credentials_file}"
                    if destination.credentials_file
                    else f"credentials_env {destination.credentials_env}"
                )
                + " were refused"
            )
            raise _BatchFailed(f"{said}: {how}") from None
        reason = _failure_reason(body, sop_uid)
        if reason is None and (code in _WHOLE_BATCH or code >= 500):
            raise _BatchFailed(said + _body_hint(response)) from None
        if reason is None:
            return Outcome(False, error=said + _body_hint(response))
        return Outcome(
            False,
            reason,
            f"{said}: Failure Reason 0x{reason:04X} ({status_meaning(reason)})",
        )
    reason = _failure_reason(answer, sop_uid)
    if reason is not None:
        return Outcome(
            False,
            reason,
            f"{destination.name} answered HTTP {_phrase(code)} but did not store the object: "
            f"Failure Reason 0x{reason:04X} ({status_meaning(reason)})",
        )
    if len(answer) and not _referenced(answer, sop_uid):
        # 202 Accepted lists what it stored; an object it does not name was not stored
        return Outcome(
            False, error=f"{destination.name}'s answer does not name the object as stored"
        )
    return Outcome(True, 0)


def _reason(exc: Exception) -> str:
    """The innermost cause of a requests exception, in one line."""
    while exc.__context__ is not None or exc.__cause__ is not None:
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner  # type: ignore[assignment]
    return str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__


def _body_hint(response: requests.Response | None) -> str:
    """A short plain-text body the server gave, where it is not DICOM JSON."""
    if response is None or not response.content:
        return ""
    kind = response.headers.get("Content-Type", "")
    if "json" in kind or "text" in kind:
        text = " ".join(response.text.split())[:200]
        return f" ({text})" if text else ""
    return ""


def stow_batch(
    destination: DicomWebDestination,
    items: list[Outgoing],
    timeout: float,
    choice: SegChoice | None = None,
    on_ack: Callable[[Outgoing, Outcome], None] | None = None,
) -> dict[int, Outcome]:
    """STOW-RS each item to ``destination``, in order; one :class:`Outcome` per item key.

    ``on_ack`` is called the moment the server confirms an object, before the next is
    sent. Once a failure that concerns the request itself (unreachable, credentials,
    URL, server error) is met, the remaining items get the same outcome unsent. Never
    raises for what the server does; a configuration that cannot be read (credentials)
    is every item's outcome.
    """
    choice = choice or SegChoice()
    results: dict[int, Outcome] = {}
    try:
        client, session = _client(destination, timeout)
    except ConfigError as exc:
        return {item.key: Outcome(False, error=str(exc)) for item in items}
    try:
        for item in items:
            outcome = deliver(
                item,
                choice,
                lambda path: _store(client, destination, path, timeout),
                functools.partial(_sop_class, item.path),
                destination.name,
            )
            results[item.key] = outcome
            if outcome.ok and on_ack is not None:
                on_ack(item, outcome)
    except _BatchFailed as exc:
        for item in items:
            results.setdefault(item.key, Outcome(False, error=str(exc)))
    finally:
        session.close()
    return results


def _sop_class(path: Path) -> str:
    return str(
        pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"]).SOPClassUID
    )
