from pathlib import Path

import pytest

from dicom_node.cli import main
from dicom_node.config import DEFAULT_CONFIG_PATH, ConfigError, load_settings, settings_from_dict


def test_default_config_is_valid_and_documented():
    s = load_settings()
    assert s.node.ae_title == "DICOM_NODE"
    assert s.node.port == 11112
    assert s.node.settle_seconds == 10
    assert s.node.allowed_calling_aes == []
    assert [d.ae_title for d in s.destinations] == ["ORTHANC"]
    assert s.node.data_dir.is_absolute()
    # every key of the shipped file carries a comment or sits under a commented block
    for line in DEFAULT_CONFIG_PATH.read_text().splitlines():
        if "=" in line and not line.lstrip().startswith("#"):
            assert "#" in line or line.split("=")[0].strip() in {
                "name",
                "ae_title",
                "host",
                "port",
                "attempts",
                "retry_backoff_seconds",
                "max_backoff_seconds",
                "seg_series_description",
                "rtstruct_series_description",
                "sr_series_description",
                "make_seg",
                "make_rtstruct",
                "make_sr",
                "manufacturer",
                "institution_name",
                "http_port",
                "metrics_port",
                "model_repository",
                "tls",
            }, line


def test_overrides_apply():
    s = load_settings(None, port=4000, ae_title="OTHER", data_dir=Path("/tmp/x"))
    assert (s.node.port, s.node.ae_title, s.node.data_dir) == (4000, "OTHER", Path("/tmp/x"))


@pytest.mark.parametrize(
    "text, message",
    [
        ("[node]\nport = 'eleven'\n", "node.port: expected an integer"),
        ("[node]\nprot = 1\n", "unknown key 'prot'"),
        ("[nodes]\n", "unknown section [nodes]"),
        ("[node]\nae_title = 'A\\\\B'\n", "not a valid AE title"),
        ("[node]\nsettle_seconds = true\n", "expected a number"),
        ("[inference]\nbackend = 'gpu'\n", "inference.backend"),
        ("[[destinations]]\nname = 'p'\nhost = 'h'\nport = 1\n", "missing required key 'ae_title'"),
        ("[node\n", "not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_error(tmp_path, text, message):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    with pytest.raises(ConfigError, match=None) as err:
        load_settings(f)
    assert message in str(err.value)


def test_validate_config_cli(tmp_path, capsys):
    assert main(["validate-config", str(DEFAULT_CONFIG_PATH)]) == 0
    bad = tmp_path / "bad.toml"
    bad.write_text("[node]\nport = 99999\n")
    assert main(["validate-config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "node.port: 99999 is not a TCP port" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"status": {"port": -1}}, "status.port: -1 is not a TCP port"),
        ({"node": {"settle_seconds": -1}}, "node.settle_seconds: must not be negative"),
        ({"node": {"unsupported_sop_class": "x"}}, "must be 'refuse' or 'fail'"),
        ({"inference": {"transport": "tcp"}}, "must be 'auto', 'grpc', 'shm' or 'cuda_shm'"),
        ({"inference": {"attempts": 0}}, "inference.attempts: must be at least 1"),
        ({"results": {"seg_compression": "zip"}}, "must be 'none', 'rle' or 'jpegls'"),
        (
            {"limits": {"max_associations_per_address": -1}},
            "limits.max_associations_per_address: must not be negative (0: no limit)",
        ),
        ({"limits": {"message_deadline_seconds": 0}}, "message_deadline_seconds: must be positive"),
        (
            {"destinations": [{"name": "a", "type": "ftp"}]},
            "destinations[0].type: must be 'dicom' (C-STORE) or 'dicomweb' (STOW-RS)",
        ),
        ({"embedded": {"viewer_port": 70000}}, "embedded.viewer_port: 70000 is not a TCP port"),
        ({"status": {"auth": "digest"}}, "status.auth: must be 'none', 'basic' or 'bearer'"),
    ],
)
def test_declared_constraints_name_the_key_and_the_rule(raw, message):
    """Each field declares its constraint; one validator words every kind the same way."""
    with pytest.raises(ConfigError) as err:
        settings_from_dict(raw)
    assert message in str(err.value)


#: Every kind of bad setting, as ``validate-config`` must refuse it: the TOML, and the one
#: line it prints. Paths under ``{tmp}`` do not exist.
BAD_SETTINGS = [
    ("[limits]\nmax_associations = -5", "limits.max_associations: must be at least 1"),
    ("[limits]\nmax_instance_bytes = -1", "limits.max_instance_bytes: must be positive"),
    ("[limits]\nmin_free_disk_mb = -100", "limits.min_free_disk_mb: must not be negative"),
    ("[limits]\nmax_instances_per_series = 0", "limits.max_instances_per_series: must be positive"),
    ("[limits]\nmax_rows_columns = 0", "limits.max_rows_columns: must be positive"),
    ("[limits]\nreserved_associations = -1", "limits.reserved_associations: must not be negative"),
    ("[limits]\nidle_timeout_seconds = 0", "limits.idle_timeout_seconds: must be positive"),
    ("[limits]\nacse_timeout = nan", "limits.acse_timeout: must be a finite number, not nan"),
    ("[limits]\nnetwork_timeout = inf", "limits.network_timeout: must be a finite number, not inf"),
    ("[limits]\ndimse_timeout = -inf", "limits.dimse_timeout: must be a finite number, not -inf"),
    ("[node]\nsettle_seconds = nan", "node.settle_seconds: must be a finite number, not nan"),
    ("[inference]\nmax_concurrent_jobs = 0", "inference.max_concurrent_jobs: must be at least 1"),
    ("[inference]\ntimeout_seconds = inf", "inference.timeout_seconds: must be a finite number"),
    ("[retention]\ndays = -1", "retention.days: must not be negative"),
    ("[retention]\ninterval_seconds = 0", "retention.interval_seconds: must be positive"),
    ("[node]\nport = 70000", "node.port: 70000 is not a TCP port"),
    ("[node]\nport = -5", "node.port: -5 is not a TCP port"),
    ("[inference]\ngrpc_port = 70000", "inference.grpc_port: 70000 is not a TCP port"),
    ("[status]\nport = -5", "status.port: -5 is not a TCP port"),
    ("[audit]\nsyslog_port = 0", "audit.syslog_port: 0 is not a TCP port"),
    (
        "[[destinations]]\nname = 'p'\nae_title = 'P'\nhost = '10.0.0.1'\nport = 70000",
        "destinations[0].port: 70000 is not a TCP port",
    ),
    ("[node]\nhost = 'not an address'", "node.host: 'not an address' is not an IP address or"),
    (
        "[node]\nallowed_hosts = ['10.0.0.0/8', 'not-an-ip/99']",
        "node.allowed_hosts[1]: 'not-an-ip/99' is not an IP address or network",
    ),
    ("[node]\nallowed_hosts = ['10.0.0.0/99']", "node.allowed_hosts[0]: '10.0.0.0/99' is not an"),
    (
        "[inference]\nbundle = '{tmp}/no-bundle'",
        "inference.bundle: {tmp}/no-bundle is not a folder",
    ),
    (
        "[[models]]\nname = 'm'\nbundle = '{tmp}/no-bundle'",
        "models[0].bundle: {tmp}/no-bundle is not a folder",
    ),
    (
        "[inference]\nmodel_repository = '{tmp}/no-repository'",
        "inference.model_repository: {tmp}/no-repository is not a folder",
    ),
    (
        "[tls]\nenabled = true\ncertificate = '{tmp}/node.pem'\nprivate_key = '{tmp}/node.key'",
        "tls.certificate: {tmp}/node.pem is not a file",
    ),
    ("[tls]\nca_certificates = '{tmp}'", "tls.ca_certificates: {tmp} is not a file"),
    (
        "[status]\nauth = 'basic'\ncredentials_file = '{tmp}/secret'",
        "status.credentials_file: {tmp}/secret is not a file",
    ),
    ("[audit]\nca_certificates = '{tmp}/ca.pem'", "audit.ca_certificates: {tmp}/ca.pem is not a"),
    ("[audit]\ntransport = 'tcp'", "audit.transport: must be 'tls' or 'udp'"),
    ("[audit]\nsyslog_host = 'bad host!'", "audit.syslog_host: 'bad host!' is not an IP address"),
    (
        "[[destinations]]\nname = 'w'\ntype = 'dicomweb'\nurl = 'https://u:pw@pacs.example/dw'",
        "destinations[0].url: holds credentials (user:password@ or a token in the query)",
    ),
    (
        "[[destinations]]\nname = 'w'\ntype = 'dicomweb'\n"
        "url = 'https://pacs.example/dw?access_token=abc'",
        "destinations[0].url: holds credentials",
    ),
    (
        "[[destinations]]\nname = 'w'\ntype = 'dicomweb'\nurl = 'https://pacs.example/dw'\n"
        "auth = 'bearer'\ncredentials_file = '{tmp}/token'",
        "destinations[0].credentials_file: {tmp}/token is not a file",
    ),
    (
        "[[routes]]\nmodels = ['spleen_seg']\nslice_thickness = [nan, 5.0]",
        "routes[0].slice_thickness: must be [min, max], finite",
    ),
    ("[node]\nae_title = 'X'\n[node]\nport = 1", "is not valid TOML"),
    ("node = 5", "[node] must be a table"),
]


@pytest.mark.parametrize(("text", "line"), BAD_SETTINGS, ids=[c[1][:48] for c in BAD_SETTINGS])
def test_validate_config_refuses_every_bad_setting_in_one_line(text, line, tmp_path, capsys):
    config = tmp_path / "bad.toml"
    config.write_text(text.replace("{tmp}", str(tmp_path)) + "\n")
    assert main(["validate-config", str(config)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    (printed,) = err.strip().splitlines()
    assert printed.startswith("dicom-node: ") and line.replace("{tmp}", str(tmp_path)) in printed
    assert "pw" not in printed and "abc" not in printed  # a secret is never repeated


def test_a_config_file_that_is_not_utf8_or_not_a_file_is_one_sentence(tmp_path, capsys):
    latin1 = tmp_path / "latin1.toml"
    latin1.write_bytes("[results]\ninstitution_name = 'Hôpital'\n".encode("latin-1"))
    folder = tmp_path / "folder.toml"
    folder.mkdir()
    for path, says in (
        (latin1, f"config file {latin1} is not UTF-8 text (byte 31); TOML files are UTF-8"),
        (folder, f"config file {folder} cannot be read: Is a directory"),
    ):
        assert main(["validate-config", str(path)]) == 2
        (printed,) = capsys.readouterr().err.strip().splitlines()
        assert printed == f"dicom-node: {says}"


def test_every_number_setting_declares_its_constraint():
    """A number without a declared range would take nan, inf or a negative unchecked."""
    import dataclasses
    import typing

    from dicom_node import config
    from dicom_node.export.dicomweb import DicomWebDestination
    from dicom_node.export.dimse import DicomDestination
    from dicom_node.sources.settings import SourceSettings

    sections = [
        config.NodeSettings,
        config.LimitSettings,
        config.TLSSettings,
        config.InferenceSettings,
        config.ResultSettings,
        config.StatusSettings,
        config.RetentionSettings,
        config.EmbeddedSettings,
        config.AuditSettings,
        DicomDestination,
        DicomWebDestination,
        SourceSettings,
    ]
    numeric = {"at_least", "positive", "finite", "port"}
    unchecked = [
        f"{cls.__name__}.{f.name}"
        for cls in sections
        for f in dataclasses.fields(cls)
        if typing.get_type_hints(cls)[f.name] in (int, float) and not numeric & set(f.metadata)
    ]
    # required, so without a default a declared constraint could take: its check() says
    # "missing required key" or "is not a TCP port" (tested above)
    assert unchecked == ["DicomDestination.port"]
