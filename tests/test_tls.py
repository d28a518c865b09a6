"""The gateway's generated TLS files: creation, reuse, and rotation of the server certificate."""

from __future__ import annotations

from cryptography import x509
from cryptography.x509.oid import ExtensionOID

from services.core.settings import Settings
from services.core.tls import CA_KEY_FILE, SERVER_CERT_FILE, SERVER_KEY_FILE, load_tls_material


def settings_for(home, **extra: str) -> Settings:
    return Settings.from_env({"AGENTMGR_HOME": str(home), **extra})


def test_first_start_creates_ca_and_server(tmp_path):
    material = load_tls_material(settings_for(tmp_path, AGENTMGR_TLS_SERVER_NAMES="manager.example,10.0.0.5"))

    server = x509.load_pem_x509_certificate(material.certificate_chain)
    names = server.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    assert "manager.example" in names.get_values_for_type(x509.DNSName)
    assert material.ca_fingerprint.startswith("sha256:")
    assert (tmp_path / "tls" / CA_KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "tls" / SERVER_KEY_FILE).stat().st_mode & 0o777 == 0o600


def test_second_start_reuses_files(tmp_path):
    first = load_tls_material(settings_for(tmp_path))
    second = load_tls_material(settings_for(tmp_path))

    assert second == first


def test_rotation_keeps_the_ca(tmp_path):
    first = load_tls_material(settings_for(tmp_path))
    (tmp_path / "tls" / SERVER_CERT_FILE).unlink()
    (tmp_path / "tls" / SERVER_KEY_FILE).unlink()

    rotated = load_tls_material(settings_for(tmp_path, AGENTMGR_TLS_SERVER_NAMES="new.example"))

    assert rotated.ca_fingerprint == first.ca_fingerprint
    assert rotated.certificate_chain != first.certificate_chain
    server = x509.load_pem_x509_certificate(rotated.certificate_chain)
    ca = x509.load_pem_x509_certificate(rotated.ca_certificate)
    server.verify_directly_issued_by(ca)
