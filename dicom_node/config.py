"""The one place settings are read and typed.

The node's configuration is a TOML file (``config/node.toml`` documents every key).
It is read once with :mod:`tomllib` into frozen dataclasses; every other module receives
those typed objects and never looks at the file or the environment itself.

Unknown keys and values of the wrong type are rejected here, at start-up, with one sentence
naming the key, so that a typo in a hospital's config never becomes a crash at 3 a.m.

Why one module of this size: it is the whole configuration schema, each setting beside
its documentation and its declared constraint, and the one validator; split, a reader
looking for one setting would look in several files.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dicom_node.common.network import is_loopback

if TYPE_CHECKING:
    from dicom_node.sources.settings import SourceSettings

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

#: The configuration shipped with the package and used when no file is given.
PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG_PATH = PROJECT_ROOT / "config" / "node.toml"

_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, <= 16


class ConfigError(ValueError):
    """A configuration value a user wrote is wrong; the message says which and why."""


# -- declared constraints ----------------------------------------------------------------
# A field's constraint is declared with it (its dataclass field's metadata) and checked by
# one generic validator (:func:`_check_field`) with one wording per kind of constraint;
# _validate keeps only what relates several fields.


def one_of(*choices: str, default: str = "", notes: dict[str, str] | None = None) -> Any:
    """A string field that takes one of ``choices`` (``default``: the first); ``notes``
    explain some of them in the error message."""
    return field(default=default or choices[0], metadata={"one_of": choices, "notes": notes or {}})


def at_least(default: float, lowest: float, note: str = "") -> Any:
    """A number field of at least ``lowest``."""
    return field(default=default, metadata={"at_least": lowest, "note": note})


def positive(default: float) -> Any:
    """A number field greater than zero."""
    return field(default=default, metadata={"positive": True})


def tcp_port(default: int, any_free: bool = False) -> Any:
    """A TCP port; with ``any_free``, 0 asks for any free port."""
    return field(default=default, metadata={"port": 0 if any_free else 1})


def finite(default: float) -> Any:
    """A number field of any finite value (TOML also has ``nan`` and ``inf``)."""
    return field(default=default, metadata={"finite": True})


def existing(kind: str, default: Any = dataclasses.MISSING) -> Any:
    """A path field naming a ``"file"`` (readable) or ``"dir"`` that must exist when set;
    checked once relative paths are resolved (:func:`check_paths`)."""
    return field(default=default, metadata={"exists": kind})


def address(default: str = "", optional: bool = False) -> Any:
    """A host: an IP address or a DNS name (``optional``: or empty)."""
    return field(default=default, metadata={"address": "optional" if optional else "required"})


def networks() -> Any:
    """A list of IP addresses or networks in CIDR notation (``10.0.0.0/8``)."""
    return field(default_factory=list, metadata={"networks": True})


#: A label of a DNS name (RFC 1123), for ``address`` fields that are not IP addresses.
_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def _quoted(options: tuple[str, ...], notes: dict[str, str]) -> str:
    words = [f"{o!r} ({notes[o]})" if o in notes else repr(o) for o in options]
    return ", ".join(words[:-1]) + " or " + words[-1]


def _check_field(value: Any, meta: Any, key: str) -> None:
    """The one validator of declared constraints, with the node's wording for each."""
    numeric = {"at_least", "positive", "finite", "port"} & set(meta)
    if numeric and isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{key}: must be a finite number, not {value}")
    if "address" in meta and (value or meta["address"] == "required"):
        if not _is_address(value):
            raise ConfigError(f"{key}: {value!r} is not an IP address or host name")
    if meta.get("networks"):
        for i, entry in enumerate(value):
            try:
                ipaddress.ip_network(entry.strip(), strict=False)
            except ValueError:
                raise ConfigError(
                    f"{key}[{i}]: {entry!r} is not an IP address or network"
                ) from None
    if "one_of" in meta and value not in meta["one_of"]:
        raise ConfigError(f"{key}: must be {_quoted(meta['one_of'], meta['notes'])}")
    if "at_least" in meta and value < meta["at_least"]:
        lowest, note = meta["at_least"], meta["note"]
        wording = "must not be negative" if lowest == 0 else f"must be at least {lowest:g}"
        raise ConfigError(f"{key}: {wording}{f' ({note})' if note else ''}")
    if meta.get("positive") and value <= 0:
        raise ConfigError(f"{key}: must be positive")
    if "port" in meta and not meta["port"] <= value < 65536:
        raise ConfigError(f"{key}: {value} is not a TCP port")


def _is_address(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip("[]"))
        return True
    except ValueError:
        labels = value.removesuffix(".").split(".")
        return len(value) <= 253 and all(_HOST_LABEL.match(label) for label in labels)


def _check_path(value: Path | None, kind: str, key: str) -> None:
    """An ``existing`` constraint, on a resolved path."""
    if value is None:
        return
    if kind == "dir" and not value.is_dir():
        raise ConfigError(f"{key}: {value} is not a folder")
    if kind == "file" and not (value.is_file() and os.access(value, os.R_OK)):
        what = "cannot be read" if value.is_file() else "is not a file"
        raise ConfigError(f"{key}: {value} {what}")


def check_paths(section: Any, key: str) -> None:
    """Every ``existing`` field of a settings section (a dataclass), paths resolved."""
    for f in dataclasses.fields(section):
        if "exists" in f.metadata:
            _check_path(getattr(section, f.name), f.metadata["exists"], f"{key}.{f.name}")


@dataclass(frozen=True)
class NodeSettings:
    """Identity and storage of the node's own application entity."""

    ae_title: str = "DICOM_NODE"
    host: str = address("0.0.0.0")
    port: int = tcp_port(11112)
    data_dir: Path = Path("var")
    settle_seconds: float = at_least(10.0, 0)
    #: Complete a series as soon as the association that carried it is released, when its
    #: slices form a volume without a gap (:mod:`dicom_node.series.completion`); the settle timer
    #: remains the rule for everything else.
    complete_on_release: bool = True
    allowed_calling_aes: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = networks()
    require_called_ae: bool = True
    #: "refuse": other storage SOP classes are rejected in negotiation;
    #: "fail": they are negotiated and each C-STORE is answered with a failure status.
    unsupported_sop_class: str = one_of("refuse", "fail")
    log_patient_identifiers: bool = False
    log_json: bool = False


@dataclass(frozen=True)
class LimitSettings:
    """Bounds that keep one misbehaving peer from taking the node down."""

    #: Associations at once. A slot is taken when an association is requested (a bare or
    #: trickling connection takes none) and given back when it ends or is refused.
    max_associations: int = at_least(16, 1)
    #: Connections one source address may hold at once (negotiating or associated); more
    #: are rejected at once (transient, local limit exceeded). 0: no limit but the above.
    max_associations_per_address: int = at_least(12, 0, "0: no limit")
    #: Slots kept for source addresses that hold none: an address already holding an
    #: association gets another only while more than this many are free.
    reserved_associations: int = at_least(4, 0)
    #: While no more slots are free than the reserved ones, an association that stored
    #: nothing for this long (a C-ECHO does not count) is aborted, so that idle peers give
    #: their slots back long before network_timeout; on a quiet node it is kept.
    idle_timeout_seconds: float = positive(20.0)
    #: Connections not yet associated (TLS handshake, A-ASSOCIATE-RQ under way), all
    #: addresses together; more are rejected at once, before anything they sent is read.
    max_pending_connections: int = at_least(64, 1)
    acse_timeout: float = positive(30.0)
    dimse_timeout: float = positive(60.0)
    network_timeout: float = positive(60.0)
    #: From accept to association established (TLS handshake and A-ASSOCIATE-RQ), in all:
    #: a peer trickling bytes cannot hold a slot longer than this.
    association_deadline_seconds: float = positive(30.0)
    #: Each PDU, and each message's fragments together (a command set, a data set), must
    #: arrive within this many seconds of the first byte, however the bytes trickle.
    message_deadline_seconds: float = positive(600.0)
    #: Also enforced as P-DATA arrives: a data set growing past it aborts the association
    #: before more of it is read into memory.
    max_instance_bytes: int = positive(512 * 1024 * 1024)
    max_instances_per_series: int = positive(5000)
    min_free_disk_mb: int = at_least(1024, 0)
    #: Free space kept for recording (job database, acknowledgement journal, logs): results
    #: are not written below it. Keep it under ``min_free_disk_mb``, where intake stops.
    reserved_disk_mb: int = at_least(64, 0)
    min_slices: int = at_least(3, 1)
    max_rows_columns: int = positive(4096)


@dataclass(frozen=True)
class TLSSettings:
    """DICOM TLS (PS3.15 B.1) for the SCP and for exports to destinations with ``tls``."""

    enabled: bool = False
    certificate: Path | None = existing("file", None)
    private_key: Path | None = existing("file", None)
    #: CA bundle that peers' certificates must chain to (client certs on the SCP, server
    #: certs on exports).
    ca_certificates: Path | None = existing("file", None)
    require_client_certificate: bool = False


@dataclass(frozen=True)
class InferenceSettings:
    """Where and how segmentation runs."""

    #: A registered backend (:data:`dicom_node.inference.BACKENDS`): "triton" (the default:
    #: a Triton server, started by the node or at triton_url) or "local" (the same pipeline
    #: in-process, for development).
    backend: str = "triton"
    #: Empty: the node starts the Triton server shipped with nvidia-pytriton. Otherwise one or
    #: more gRPC URLs (host:port) of running servers; requests are spread across them.
    triton_url: list[str] = field(default_factory=list)
    model: str = "spleen_seg"
    model_repository: Path = Path("model_repository")
    bundle: Path = Path("bundles/spleen_ct_demo")
    #: "auto" (shared memory when the server is on this host), "grpc" or "shm".
    transport: str = one_of("auto", "grpc", "shm", "cuda_shm")
    device: str = one_of("auto", "cpu", "cuda")
    timeout_seconds: float = positive(600.0)
    startup_timeout_seconds: float = positive(180.0)
    attempts: int = at_least(3, 1)
    retry_backoff_seconds: float = at_least(5.0, 0)
    #: Series processed at once; Triton batches and schedules their requests on the GPU.
    max_concurrent_jobs: int = at_least(2, 1)
    #: Ports of the Triton server the node starts; 0: any free port.
    grpc_port: int = tcp_port(8001, any_free=True)
    http_port: int = tcp_port(8000, any_free=True)
    metrics_port: int = tcp_port(8002, any_free=True)


@dataclass(frozen=True)
class ResultSettings:
    """What the node writes back for a segmented series."""

    seg_series_description: str = "AI segmentation"
    rtstruct_series_description: str = "AI contours"
    sr_series_description: str = "AI measurements"
    #: "binary" (Segmentation Storage) or "labelmap" (Label Map Segmentation Storage).
    seg_type: str = one_of("binary", "labelmap")
    #: Transfer syntax of a Label Map SEG: "none" (Explicit VR Little Endian), "rle" (RLE
    #: Lossless) or "jpegls" (JPEG-LS Lossless). A binary SEG is always uncompressed.
    seg_compression: str = one_of("none", "rle", "jpegls", default="rle")
    #: RTSTRUCT: at most this many contours per ROI on one slice, the largest kept (0: no
    #: limit). Bounds the object a fragmented (noisy) label map gives.
    rtstruct_max_contours_per_slice: int = at_least(100, 0)
    #: RTSTRUCT: contours enclosing less than this many mm² are left out (0: none are).
    rtstruct_min_contour_area_mm2: float = at_least(0.0, 0)
    make_seg: bool = True
    make_rtstruct: bool = True
    make_sr: bool = True
    manufacturer: str = "dicom-node"
    institution_name: str = ""
    #: Worker processes that build and encode the objects beside the node's own process
    #: (:mod:`dicom_node.encode.processes`); 0: all in the node's process.
    encode_processes: int = at_least(2, 0)
    #: A result holding fewer labels than this is encoded in the node's process: sending it
    #: to the workers costs more than it saves (measured at about 8 to 16 labels).
    encode_processes_min_labels: int = at_least(12, 1)


@dataclass(frozen=True)
class StatusSettings:
    """The HTTP status service: job pages with previews, /healthz, /readyz, /metrics.

    Loopback by default: the pages show clinical images, so serving them further is a
    deliberate decision (behind a reverse proxy that authenticates).
    """

    enabled: bool = False
    host: str = address("127.0.0.1")
    #: 0: any free port (tests).
    port: int = tcp_port(8080, any_free=True)
    #: "none", "basic" or "bearer": HTTP authentication of every page but /healthz and
    #: /readyz. Required when ``host`` is not a loopback address.
    auth: str = one_of("none", "basic", "bearer")
    #: Where the secret is (never in this file): ``user:password`` for basic, the token
    #: for bearer (:mod:`dicom_node.common.credentials`).
    credentials_file: Path | None = existing("file", None)
    credentials_env: str = ""


@dataclass(frozen=True)
class RetentionSettings:
    """How long received instances and results are kept. Nothing still owed to a
    destination, and no series still being received or processed, is ever deleted."""

    #: Delete a finished series' spool files and results this many days after it finished
    #: (0: keep forever).
    days: float = at_least(0.0, 0)
    #: Delete the oldest finished series while the spool and results hold more than this
    #: (0: no limit).
    max_bytes: int = at_least(0, 0)
    #: How often the policy is applied.
    interval_seconds: float = positive(3600.0)


@dataclass(frozen=True)
class ModelSettings:
    """One segmentation model: a MONAI bundle, and the Triton model that serves it.

    With no ``triton_model`` the node writes the Triton models the bundle needs into its data
    directory and serves them (``dicom_node.inference.triton.repository``): a bundle is a folder,
    not a hand-written model.
    """

    name: str
    bundle: Path = existing("dir")
    triton_model: str = ""


@dataclass(frozen=True)
class Route:
    """Which series go to which models. Every condition given must hold; empty ones match
    anything. Strings compare case-insensitively; ranges are inclusive [min, max]."""

    models: list[str]
    modality: list[str] = field(default_factory=list)
    body_part: list[str] = field(default_factory=list)
    #: A regular expression searched in Series Description.
    series_description: str = ""
    calling_ae: list[str] = field(default_factory=list)
    slice_thickness: list[float] = field(default_factory=list)
    slice_count: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Destination:
    """A peer that receives results. ``type`` names the transport that sends them
    (:data:`dicom_node.export.transport.TRANSPORTS`): ``"dicom"`` (C-STORE,
    :class:`~dicom_node.export.dimse.DicomDestination`) or ``"dicomweb"`` (STOW-RS,
    :class:`~dicom_node.export.dicomweb.DicomWebDestination`), each a subclass with the keys
    its transport needs. The keys here are every destination's: how often and how long the
    outbox tries, and which SEG it gets."""

    name: str
    type: str = "dicom"
    attempts: int = at_least(20, 1)
    retry_backoff_seconds: float = at_least(5.0, 0)
    max_backoff_seconds: float = at_least(300.0, 0)
    #: Which SEG this destination gets when [results] seg_type = "labelmap": "auto" (the
    #: label map, or a binary SEG where the destination refuses the label map class),
    #: "labelmap" (never a fallback) or "binary" (always the binary SEG).
    seg_type: str = one_of("auto", "labelmap", "binary")

    def check(self, key: str, settings: Settings) -> None:
        """Raise :class:`ConfigError` for keys that contradict each other or another
        section; subclasses check their own and call this."""
        if self.seg_type == "labelmap" and settings.results.seg_type != "labelmap":
            raise ConfigError(
                f"{key}.seg_type: 'labelmap' needs [results] seg_type = 'labelmap' (the node "
                "makes a binary SEG only)"
            )

    def runs_embedded(self) -> bool:
        """Whether the node starts this destination itself (:mod:`dicom_node.service.embedded`)."""
        return False

    def asks_commitment(self) -> bool:
        """Whether the node asks this destination to commit to what it acknowledged
        (:mod:`dicom_node.export.commitment`)."""
        return False


@dataclass(frozen=True)
class EmbeddedSettings:
    """The PACS and viewer the node starts for a destination with ``embedded = true``.

    Only used then: a configuration that sends elsewhere starts neither. Everything listens
    on loopback, because neither Orthanc nor the viewer asks for credentials here.
    """

    #: Where the viewer (OHIF, with ``/dicom-web`` on the same origin) is served.
    viewer_host: str = address("127.0.0.1")
    viewer_port: int = tcp_port(3000, any_free=True)
    #: Orthanc's own HTTP port (REST and DICOMweb), reached by the viewer through the node.
    orthanc_http_port: int = tcp_port(8042)
    #: The OHIF ``dist/`` folder ``make install`` unpacks from the pinned npm package.
    viewer_dir: Path = Path(".ohif/app-3.13.2")
    orthanc_executable: str = "Orthanc"
    dicomweb_plugin: Path = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
    #: Orthanc must answer on its ports within this many seconds of its start.
    startup_timeout_seconds: float = positive(60.0)


@dataclass(frozen=True)
class AuditSettings:
    """``[audit]``: DICOM audit messages (PS3.15 A.5) to a file and a syslog collector
    (:mod:`dicom_node.service.audit`).

    ``file`` is relative to ``data_dir`` unless absolute. With ``syslog_host`` empty only
    the file is written. ``transport = "tls"`` (RFC 5425, the ATNA port 6514) verifies the
    collector against ``ca_certificates`` (the system's CAs when not given) and presents
    ``certificate`` and ``private_key`` when given; ``"udp"`` (RFC 5426, port 514) sends each
    message in one datagram, which a collector may cut past 2048 bytes.
    """

    enabled: bool = False
    file: Path = Path("logs/audit.log")
    syslog_host: str = address("", optional=True)
    syslog_port: int = tcp_port(6514)
    transport: str = one_of("tls", "udp")
    ca_certificates: Path | None = existing("file", None)
    certificate: Path | None = existing("file", None)
    private_key: Path | None = existing("file", None)
    #: APP-NAME of the syslog messages.
    app_name: str = "dicom-node"
    #: AuditEnterpriseSiteID: the site (hospital) the node belongs to, if set.
    site_id: str = ""
    #: Messages kept for the collector while it does not answer; the oldest go first.
    backlog: int = at_least(10000, 1)


@dataclass(frozen=True)
class Settings:
    """Everything the node needs, typed."""

    node: NodeSettings = field(default_factory=NodeSettings)
    limits: LimitSettings = field(default_factory=LimitSettings)
    tls: TLSSettings = field(default_factory=TLSSettings)
    inference: InferenceSettings = field(default_factory=InferenceSettings)
    results: ResultSettings = field(default_factory=ResultSettings)
    status: StatusSettings = field(default_factory=StatusSettings)
    destinations: list[Destination] = field(default_factory=list)
    #: Models and routing rules; with no [[models]], the [inference] model and bundle, and
    #: with no [[routes]], every series goes to the first model.
    models: list[ModelSettings] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    embedded: EmbeddedSettings = field(default_factory=EmbeddedSettings)
    #: PACSs studies can be fetched from (``[[sources]]``, :mod:`dicom_node.sources`).
    sources: list[SourceSettings] = field(default_factory=list)
    audit: AuditSettings = field(default_factory=AuditSettings)
    #: Directory the relative paths of the config are resolved against.
    base_dir: Path = Path(".")

    @property
    def data_dir(self) -> Path:
        return self.node.data_dir

    def replace(self, **sections: Any) -> Settings:
        return dataclasses.replace(self, **sections)


def check_ae_title(value: str, key: str) -> None:
    """Raise :class:`ConfigError` unless ``value`` is a valid AE title (PS3.5 AE VR)."""
    if not _AE_TITLE.match(value) or not value.strip():
        raise ConfigError(
            f"{key}: {value!r} is not a valid AE title (1-16 characters, no backslash)"
        )


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    """Return ``value`` as ``annotation`` or raise :class:`ConfigError` naming ``key``."""
    origin = typing.get_origin(annotation)
    if origin is list:
        (item_type,) = typing.get_args(annotation)
        if isinstance(value, str) and item_type is str:
            value = [value] if value else []
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__}")
        return [_coerce(v, item_type, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(value, args[0], key)
    if annotation is Path:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a path string, got {type(value).__name__}")
        return Path(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {type(value).__name__}")
        return float(value)
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {type(value).__name__}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {type(value).__name__}")
        return value
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {type(value).__name__}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r}")  # a bug, not a user error


def _build(cls: type, table: Any, key: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{key}] must be a table")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(table) - names)
    if unknown:
        raise ConfigError(
            f"[{key}]: unknown key {unknown[0]!r} (known: {', '.join(sorted(names))})"
        )
    kwargs = {name: _coerce(v, hints[name], f"{key}.{name}") for name, v in table.items()}
    for f in dataclasses.fields(cls):
        if f.name in kwargs:
            _check_field(kwargs[f.name], f.metadata, f"{key}.{f.name}")
    try:
        return cls(**kwargs)
    except TypeError as exc:  # a required key is missing
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.name not in kwargs
            and f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        ]
        raise ConfigError(f"[{key}]: missing required key {missing[0]!r}") from exc


def check_auth(auth: str, file: Path | None, env: str, key: str) -> None:
    if auth != "none" and bool(file) == bool(env):
        raise ConfigError(
            f"{key}: auth = {auth!r} needs one of credentials_file or credentials_env "
            "(the secret is never written in the configuration)"
        )


def _validate(s: Settings) -> None:
    from dicom_node.inference import backend_names  # the backends' registry

    if s.inference.backend not in backend_names():
        raise ConfigError(
            "inference.backend: must be "
            + " or ".join(repr(n) for n in backend_names())
            + f", not {s.inference.backend!r}"
        )
    check_ae_title(s.node.ae_title, "node.ae_title")
    for i, ae in enumerate(s.node.allowed_calling_aes):
        check_ae_title(ae, f"node.allowed_calling_aes[{i}]")
    check_auth(s.status.auth, s.status.credentials_file, s.status.credentials_env, "status")
    if s.status.enabled and s.status.auth == "none" and not is_loopback(s.status.host):
        raise ConfigError(
            f"status.host: {s.status.host} is reachable beyond this machine, and the pages "
            'show clinical images: set status.auth ("basic" or "bearer") with '
            "credentials_file or credentials_env, or bind to 127.0.0.1"
        )
    names = set()
    for i, d in enumerate(s.destinations):
        if d.name in names:
            raise ConfigError(f"destinations[{i}].name: {d.name!r} is used twice")
        names.add(d.name)
        d.check(f"destinations[{i}]", s)
    _validate_embedded(s)
    _validate_sources(s)
    model_names = [m.name for m in s.models]
    for i, m in enumerate(s.models):
        if model_names.count(m.name) > 1:
            raise ConfigError(f"models[{i}].name: {m.name!r} is used twice")
    for i, r in enumerate(s.routes):
        key = f"routes[{i}]"
        if not r.models:
            raise ConfigError(f"{key}.models: name at least one model")
        for name in r.models:
            if name not in (model_names or [s.inference.model]):
                raise ConfigError(f"{key}.models: {name!r} is not a configured model")
        try:
            re.compile(r.series_description)
        except re.error as exc:
            raise ConfigError(
                f"{key}.series_description: not a regular expression: {exc}"
            ) from None
        for rng in ("slice_thickness", "slice_count"):
            value = getattr(r, rng)
            if value and (len(value) != 2 or not value[0] <= value[1] < math.inf):
                raise ConfigError(f"{key}.{rng}: must be [min, max], finite")


def _validate_embedded(s: Settings) -> None:
    """One embedded destination at most, and its viewer on loopback only (the destination
    itself checks where it listens)."""
    embedded = [i for i, d in enumerate(s.destinations) if d.runs_embedded()]
    if len(embedded) > 1:
        raise ConfigError(f"destinations[{embedded[1]}].embedded: only one destination can be")
    e = s.embedded
    if not is_loopback(e.viewer_host):
        raise ConfigError(
            f"embedded.viewer_host: the viewer shows images without credentials, so it "
            f"listens on loopback only, not {e.viewer_host!r}"
        )


def _validate_sources(s: Settings) -> None:
    """Each ``[[sources]]`` entry's own checks, and one name for one source."""
    names = set()
    for i, source in enumerate(s.sources):
        if source.name in names:
            raise ConfigError(f"sources[{i}].name: {source.name!r} is used twice")
        names.add(source.name)
        source.check(f"sources[{i}]", s)


def _source(table: Any, key: str) -> SourceSettings:
    from dicom_node.sources.settings import SourceSettings  # the sources' stage

    return _build(SourceSettings, table, key)


def _resolve(path: Path, base: Path) -> Path:
    return path if path.is_absolute() else (base / path)


def _resolved_paths(d: Any, base: Path) -> dict[str, Any]:
    """Every :class:`~pathlib.Path` field of the dataclass ``d`` resolved against ``base``,
    as keyword arguments for :func:`dataclasses.replace` (typed ``Any``: mypy checks ``**``
    of a dict against every field, not only those it names)."""
    return {
        f.name: _resolve(value, base).resolve()
        for f in dataclasses.fields(d)
        if isinstance(value := getattr(d, f.name), Path)
    }


def _destination(table: Any, key: str) -> Destination:
    """A ``[[destinations]]`` table as the settings of its ``type``'s transport."""
    from dicom_node.export.transport import destination_settings  # the transports' registry

    if not isinstance(table, dict):
        raise ConfigError(f"[{key}] must be a table")
    kind = table.get("type", "dicom")
    cls = destination_settings(kind) if isinstance(kind, str) else None
    if cls is None:
        from dicom_node.export.transport import transport_names

        known = [f"{k!r} ({protocol})" for k, protocol in transport_names().items()]
        raise ConfigError(f"{key}.type: must be {', '.join(known[:-1])} or {known[-1]}")
    return _build(cls, table, key)


def _array(raw: dict[str, Any], name: str) -> list[Any]:
    value = raw.get(name, [])
    if not isinstance(value, list):
        raise ConfigError(f"{name} must be an array of tables ([[{name}]])")
    return value


def settings_from_dict(raw: dict[str, Any], base_dir: Path = Path(".")) -> Settings:
    """Build and validate :class:`Settings` from a parsed TOML document."""
    known = {
        "node",
        "limits",
        "tls",
        "inference",
        "results",
        "status",
        "destinations",
        "models",
        "routes",
        "retention",
        "embedded",
        "sources",
        "audit",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(f"unknown section [{unknown[0]}] (known: {', '.join(sorted(known))})")
    dests = _array(raw, "destinations")
    s = Settings(
        node=_build(NodeSettings, raw.get("node", {}), "node"),
        limits=_build(LimitSettings, raw.get("limits", {}), "limits"),
        tls=_build(TLSSettings, raw.get("tls", {}), "tls"),
        inference=_build(InferenceSettings, raw.get("inference", {}), "inference"),
        results=_build(ResultSettings, raw.get("results", {}), "results"),
        status=_build(StatusSettings, raw.get("status", {}), "status"),
        destinations=[_destination(d, f"destinations[{i}]") for i, d in enumerate(dests)],
        models=[
            _build(ModelSettings, m, f"models[{i}]") for i, m in enumerate(_array(raw, "models"))
        ],
        routes=[_build(Route, r, f"routes[{i}]") for i, r in enumerate(_array(raw, "routes"))],
        retention=_build(RetentionSettings, raw.get("retention", {}), "retention"),
        embedded=_build(EmbeddedSettings, raw.get("embedded", {}), "embedded"),
        sources=[_source(t, f"sources[{i}]") for i, t in enumerate(_array(raw, "sources"))],
        audit=_build(AuditSettings, raw.get("audit", {}), "audit"),
        base_dir=base_dir,
    )
    _validate(s)
    inf = s.inference
    tls = s.tls
    if tls.enabled and not (tls.certificate and tls.private_key):
        raise ConfigError("tls: enabled needs certificate and private_key")
    destinations = [dataclasses.replace(d, **_resolved_paths(d, base_dir)) for d in s.destinations]
    status = s.status
    if status.credentials_file:
        status = dataclasses.replace(
            status, credentials_file=_resolve(status.credentials_file, base_dir).resolve()
        )
    # Typed Any: mypy checks ``**`` of a dict against every field, not only those it names.
    tls_paths: dict[str, Any] = {
        k: _resolve(getattr(tls, k), base_dir).resolve()
        for k in ("certificate", "private_key", "ca_certificates")
        if getattr(tls, k)
    }
    tls = dataclasses.replace(tls, **tls_paths)
    audit_paths: dict[str, Any] = {
        k: _resolve(getattr(s.audit, k), base_dir).resolve()
        for k in ("certificate", "private_key", "ca_certificates")
        if getattr(s.audit, k)
    }
    audit = dataclasses.replace(s.audit, **audit_paths)
    models = s.models or [ModelSettings(name=inf.model, triton_model=inf.model, bundle=inf.bundle)]
    return s.replace(
        tls=tls,
        audit=audit,
        destinations=destinations,
        status=status,
        models=[
            dataclasses.replace(m, bundle=_resolve(m.bundle, base_dir).resolve()) for m in models
        ],
        node=dataclasses.replace(s.node, data_dir=_resolve(s.node.data_dir, base_dir).resolve()),
        embedded=dataclasses.replace(
            s.embedded, viewer_dir=_resolve(s.embedded.viewer_dir, base_dir).resolve()
        ),
        inference=dataclasses.replace(
            inf,
            model_repository=_resolve(inf.model_repository, base_dir).resolve(),
            bundle=_resolve(inf.bundle, base_dir).resolve(),
        ),
    )


def check_files(s: Settings, models_listed: bool = True) -> None:
    """Raise :class:`ConfigError` unless the files and folders the settings name exist
    (``existing`` fields, paths resolved), and the model repository where the node serves
    hand-written Triton models from it.

    Apart from :func:`settings_from_dict`, which only reads values, so that settings can be
    built for a machine other than this one; :func:`load_settings` calls both.
    ``models_listed``: the models came from ``[[models]]``, not ``[inference]``.
    """
    for name in ("tls", "status", "audit"):
        check_paths(getattr(s, name), name)
    for i, d in enumerate(s.destinations):
        check_paths(d, f"destinations[{i}]")
    for i, m in enumerate(s.models):
        if models_listed:
            check_paths(m, f"models[{i}]")
        else:
            _check_path(m.bundle, "dir", "inference.bundle")
    inf = s.inference
    serves_repository = inf.backend == "triton" and not inf.triton_url
    if serves_repository and any(m.triton_model for m in s.models):
        _check_path(inf.model_repository, "dir", "inference.model_repository")


def load_settings(path: Path | None = None, **overrides: Any) -> Settings:
    """Read ``path`` (the shipped default when ``None``) and apply command-line overrides.

    Relative paths in the file are resolved against the project root (the folder that holds
    ``config/`` and ``model_repository/``), so a config means the same wherever the node is
    started from.
    """
    path = Path(path) if path is not None else DEFAULT_CONFIG_PATH
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {exc.start}); TOML files are UTF-8"
        ) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc.strerror}") from None
    base = PROJECT_ROOT
    if not isinstance(raw.get("node", {}), dict):
        raise ConfigError("[node] must be a table")
    node = dict(raw.get("node", {}))
    for key, value in overrides.items():
        if value is not None:
            node[key] = str(value) if isinstance(value, Path) else value
    raw["node"] = node
    settings = settings_from_dict(raw, base_dir=base)
    check_files(settings, models_listed=bool(raw.get("models")))
    return settings
