"""Optional mutual TLS on the internal plane, on top of the cluster token (common/rpc/auth.py).

Turned on by three PEM files, in every process of the cluster (all three or none):

    DOPD_TLS_CERT   this cluster's certificate      DOPD_TLS_KEY   its private key
    DOPD_TLS_CA     the CA that signed it (and that every peer's certificate must chain to)

`dopd certs DIR` makes a development CA and one cluster certificate (`make_certs`); production
would use its own CA (cert-manager, say) with the same three files.

- Servers of the internal plane (workers, the planner) listen with TLS and require every client's
  certificate, verified against the CA: a client without one, with one another CA signed, or in
  plaintext fails the handshake (it sees UNAVAILABLE; no handler runs). The cluster token is still
  checked on top. Probes of such a port need the certificate too (grpc_health_probe -tls ...).
- The gateway's port stays plaintext: its clients are the public, who are not cluster members
  (API keys guard the HTTP API). Its own calls to workers and the planner use TLS.
- Callers (`internal_channel`) present this process's certificate and check the server's against
  the CA and the name `TLS_NAME`, whatever address it was reached at: the certificate names the
  cluster, not a host, so one certificate serves every process wherever it runs.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

import grpc

ENV_CERT, ENV_KEY, ENV_CA = "DOPD_TLS_CERT", "DOPD_TLS_KEY", "DOPD_TLS_CA"
TLS_NAME = "dopd-internal"  # the name every cluster certificate carries, and every caller checks


@dataclass(frozen=True)
class TlsFiles:
    cert: bytes
    key: bytes
    ca: bytes


def tls_files() -> TlsFiles | None:
    """This process's TLS material from the environment; None when TLS is off. ValueError when
    only some of the three are set or a file cannot be read: half-configured TLS must not fall
    back to plaintext silently."""
    paths = {name: os.environ.get(name, "") for name in (ENV_CERT, ENV_KEY, ENV_CA)}
    if not any(paths.values()):
        return None
    missing = [name for name, path in paths.items() if not path]
    if missing:
        raise ValueError(f"TLS needs all of {ENV_CERT}, {ENV_KEY} and {ENV_CA}; {', '.join(missing)} not set")
    try:
        cert, key, ca = (Path(paths[name]).read_bytes() for name in (ENV_CERT, ENV_KEY, ENV_CA))
    except OSError as exc:
        raise ValueError(f"cannot read a TLS file: {exc}") from None
    return TlsFiles(cert, key, ca)


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    # NOTE: the client's certificate is required at the handshake. We wanted a client without one
    # to hear UNAUTHENTICATED (as a call without the token does), which needs the server to ask
    # for a certificate without requiring it; grpcio's Python API has no such mode
    # (require_client_auth=False does not ask at all, so no peer would have an identity). So the
    # connection itself is refused: the client sees UNAVAILABLE, and nothing reaches a handler.
    return grpc.ssl_server_credentials([(files.key, files.cert)], root_certificates=files.ca,
                                       require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    return grpc.ssl_channel_credentials(root_certificates=files.ca, private_key=files.key,
                                        certificate_chain=files.cert)


def channel_options(files: TlsFiles | None) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", TLS_NAME)] if files is not None else []


def make_certs(directory: Path, names: tuple[str, ...] = (), days: int = 365) -> dict[str, Path]:
    """A development CA and one certificate for the whole cluster, signed by it, in `directory`:
    ca.pem, ca-key.pem, cert.pem, key.pem (keys readable by this user only). The certificate names
    TLS_NAME, localhost, 127.0.0.1 and `names` (host names or IP addresses), and serves as both
    server and client certificate."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dopd development CA")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = []
    for name in (TLS_NAME, "localhost", "127.0.0.1", *names):
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, TLS_NAME)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .sign(ca_key, hashes.SHA256()))

    def pem_key(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    out = {"ca": directory / "ca.pem", "ca_key": directory / "ca-key.pem", "cert": directory / "cert.pem",
           "key": directory / "key.pem"}
    out["ca"].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    out["cert"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    for name, k in (("ca_key", ca_key), ("key", key)):
        fd = os.open(out[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem_key(k))
    return out
