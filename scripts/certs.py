"""TLS certificates and SuperNode keys for a Flower deployment: `python -m scripts.certs`.

Writes, into one directory:

- `ca.crt`, `ca.key`: a private certificate authority (keep `ca.key` offline);
- `server.pem`, `server.key`: the SuperLink's certificate, signed by the CA, valid for the host
  names and IP addresses given (default: 127.0.0.1, localhost and `superlink`, the SuperLink's
  name on the Docker compose network);
- `supernode-<i>.key`, `supernode-<i>.pub`: one EC P-384 key pair per SuperNode, in OpenSSH
  format: `flower-supernode --auth-supernode-private-key` reads the private key with
  `load_ssh_private_key`, and `flwr supernode register` reads the public key with
  `load_ssh_public_key` and accepts NIST curves only (flwr 1.42 source).

Each SuperNode host needs `ca.crt` and its own `supernode-<i>.key`; the SuperLink host needs
`ca.crt`, `server.pem` and `server.key`; whoever registers the nodes needs the `.pub` files.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

DEFAULT_HOSTS = ("127.0.0.1", "localhost", "superlink")
_VALID_DAYS = 365


@dataclass(frozen=True)
class ServerCredentials:
    ca_cert: Path
    server_cert: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeys:
    private_key: Path
    public_key: Path


def generate_server_credentials(out_dir: Path, hosts: tuple[str, ...] = DEFAULT_HOSTS) -> ServerCredentials:
    """A fresh CA and a SuperLink certificate it signed, valid for `hosts` (names or IPs)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedcybgd deployment CA")])
    ca_cert = _signed(ca_name, ca_key.public_key(), ca_name, ca_key, [
        (x509.BasicConstraints(ca=True, path_length=0), True),
        (x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                       key_encipherment=False, data_encipherment=False, key_agreement=False,
                       encipher_only=False, decipher_only=False), True),
        (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)])
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])])
    server_cert = _signed(server_name, server_key.public_key(), ca_name, ca_key, [
        (x509.SubjectAlternativeName([_san(h) for h in hosts]), False),
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False),
        (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)])

    creds = ServerCredentials(out_dir / "ca.crt", out_dir / "server.pem", out_dir / "server.key")
    _write_private(out_dir / "ca.key", _pem_private(ca_key))
    _write_public(creds.ca_cert, ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_public(creds.server_cert, server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(creds.server_key, _pem_private(server_key))
    return creds


def generate_node_keys(out_dir: Path, name: str) -> NodeKeys:
    """One SuperNode's EC P-384 key pair, in the OpenSSH formats Flower 1.42 reads."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    keys = NodeKeys(out_dir / f"{name}.key", out_dir / f"{name}.pub")
    _write_private(keys.private_key, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()))
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                           serialization.PublicFormat.OpenSSH)
    _write_public(keys.public_key, public + f" {name}\n".encode())
    return keys


def missing_files(out_dir: Path, supernodes: int) -> list[Path]:
    """The files `compose.tls.yaml` mounts that are not regular files in `out_dir`.

    Checked before `docker compose up`: Docker would otherwise create root-owned directories at
    missing single-file mount paths (short syntax), or stop with a less direct error (long syntax).
    """
    names = ["ca.crt", "server.pem", "server.key"] + [f"supernode-{i}.key" for i in range(1, supernodes + 1)]
    return [out_dir / name for name in names if not (out_dir / name).is_file()]


def _signed(subject: x509.Name, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name,
            issuer_key: ec.EllipticCurvePrivateKey,
            extensions: list[tuple[x509.ExtensionType, bool]]) -> x509.Certificate:
    """A certificate for `subject`, valid from 5 minutes ago (clock skew) for _VALID_DAYS, with
    `extensions` as (extension, critical), signed by `issuer_key`."""
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=_VALID_DAYS)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(issuer_key, hashes.SHA384())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write_private(path: Path, data: bytes) -> None:
    """Owner-only from the first byte: the key never sits readable on disk."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _write_public(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    path.chmod(0o644)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("certs"), help="output directory")
    parser.add_argument("--supernodes", type=int, default=2, help="SuperNode key pairs to create")
    parser.add_argument("--host", action="append", dest="hosts", metavar="NAME_OR_IP",
                        help="name or IP the SuperNodes use to reach the SuperLink (repeatable; "
                             f"default: {' '.join(DEFAULT_HOSTS)})")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 naming each missing file (before docker compose up)")
    args = parser.parse_args()
    if args.check:
        missing = missing_files(args.out, args.supernodes)
        for path in missing:
            why = ("a directory (Docker makes one at a missing mount path): remove it, e.g. sudo rm -r"
                   if path.is_dir() else "missing:")
            print(f"{why} {path}", file=sys.stderr)
        if missing:
            print(f"create them first: .venv/bin/python -m scripts.certs --out {args.out} "
                  f"--supernodes {args.supernodes}", file=sys.stderr)
            return 1
        print(f"{args.out}: every certificate and key for {args.supernodes} SuperNodes is there")
        return 0
    hosts = tuple(args.hosts) if args.hosts else DEFAULT_HOSTS
    creds = generate_server_credentials(args.out, hosts)
    print(f"CA {creds.ca_cert}; SuperLink certificate {creds.server_cert} for {', '.join(hosts)}")
    for i in range(1, args.supernodes + 1):
        keys = generate_node_keys(args.out, f"supernode-{i}")
        print(f"SuperNode {i}: {keys.private_key} (keep on that node), {keys.public_key} (register)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
