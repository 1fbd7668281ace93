"""TLS certificates and client tokens: who may talk to a server, and to whom a client talks.

A session's one connection is TLS 1.3 (:mod:`.transport`). The server proves
who it is with its certificate: the client checks it against the certificate
(or CA) it was given, and the host name it dialled, before it sends a byte.
The client proves it may use the model with an API token, checked in the
server's parent process before any session worker exists (``server.serve``).

Tokens file (``cryptogen serve --tokens FILE``): one client per line,
``NAME TOKEN``; blank lines and ``#`` comments are ignored. NAME is the
client's identity for the per-client session limit; TOKEN is at least 128
bits of randomness (``cryptogen credentials`` makes one). Tokens are compared
in constant time (``hmac.compare_digest``).

A self-signed certificate is as good as a CA's here, provided the client pins
it: ``cryptogen credentials`` writes one for the server's host names, and the
local server that ``CryptoGenForCausalLM.from_pretrained(path)`` starts makes
a fresh one (and a fresh token) for each start.
"""

from __future__ import annotations

import datetime
import hmac
import ipaddress
import os
import secrets
import ssl
from pathlib import Path

MIN_TOKEN_CHARS = 22  # token_urlsafe(16): 128 bits


class CredentialsError(ValueError):
    """A certificate, key or token file is missing or unusable."""


def new_token() -> str:
    return secrets.token_urlsafe(32)  # 256 bits


def self_signed_certificate(hosts: list[str], days: int = 365) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) for ``hosts`` (DNS names or IP addresses)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"cryptogen_hf server {hosts[0]}")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def server_tls_context(cert_file: str | Path, key_file: str | Path) -> ssl.SSLContext:
    """The server's TLS 1.3 context; a clear error for a missing or mismatched pair."""
    for what, path in (("certificate", cert_file), ("private key", key_file)):
        if not path or not Path(path).is_file():
            raise CredentialsError(f"TLS {what} file {str(path)!r} not found (make a pair with `cryptogen credentials`)")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        context.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        raise CredentialsError(f"TLS certificate {cert_file} and key {key_file} do not load as a pair: {exc}") from None
    return context


def client_tls_context(server_cert: str | Path | bytes | None) -> ssl.SSLContext:
    """The client's context: verify the server against ``server_cert`` (a PEM file
    or PEM bytes: the server's own certificate or its CA), or the system's CAs if None."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    try:
        if server_cert is None:
            context.load_default_certs()
        elif isinstance(server_cert, bytes):
            context.load_verify_locations(cadata=server_cert.decode("ascii"))
        else:
            if not Path(server_cert).is_file():
                raise CredentialsError(f"server certificate file {str(server_cert)!r} not found")
            context.load_verify_locations(cafile=str(server_cert))
    except ssl.SSLError as exc:
        raise CredentialsError(f"server certificate {server_cert!r} is not a usable PEM certificate: {exc}") from None
    return context


def load_tokens(path: str | Path) -> dict[str, str]:
    """NAME -> TOKEN from a tokens file; refuses short tokens and duplicate names."""
    path = Path(path)
    if not path.is_file():
        raise CredentialsError(f"tokens file {str(path)!r} not found (make one with `cryptogen credentials`)")
    tokens: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 2:
            raise CredentialsError(f"{path}:{number}: expected 'NAME TOKEN'")
        name, token = parts
        if len(token) < MIN_TOKEN_CHARS:
            raise CredentialsError(f"{path}:{number}: the token of {name!r} is shorter than {MIN_TOKEN_CHARS} characters (128 bits)")
        if name in tokens:
            raise CredentialsError(f"{path}:{number}: client name {name!r} appears twice")
        tokens[name] = token
    if not tokens:
        raise CredentialsError(f"tokens file {path} names no client")
    return tokens


def client_named_by(tokens: dict[str, str], presented: str) -> str | None:
    """The client whose token ``presented`` is, or None; every entry is compared in constant time."""
    found = None
    presented_bytes = presented.encode("utf-8", errors="replace")
    for name, token in tokens.items():
        if hmac.compare_digest(presented_bytes, token.encode("utf-8")):
            found = name
    return found


def write_credentials(out_dir: str | Path, hosts: list[str], client_name: str = "client") -> dict[str, Path]:
    """server.pem, server.key (0600), tokens.txt (0600) and client.token (0600) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cert, key = self_signed_certificate(hosts)
    token = new_token()
    files = {"cert": out / "server.pem", "key": out / "server.key", "tokens": out / "tokens.txt", "token": out / "client.token"}
    secret = {"key": key, "tokens": f"{client_name} {token}\n".encode(), "token": f"{token}\n".encode()}
    files["cert"].write_bytes(cert)
    for name, data in secret.items():
        fd = os.open(files[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    return files


def read_token(token: str | None, token_file: str | Path | None) -> str:
    """The client's token from a string or a file (first line)."""
    if token:
        return token.strip()
    if token_file:
        path = Path(token_file)
        if not path.is_file():
            raise CredentialsError(f"token file {str(path)!r} not found")
        text = path.read_text().strip()
        return text.splitlines()[0].strip() if text else ""
    raise CredentialsError("a token is needed to use this server: pass token= (or --token-file)")
