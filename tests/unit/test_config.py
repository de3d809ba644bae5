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
