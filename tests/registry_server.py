"""Real registries for the tests: Debian's ``docker-registry`` on 127.0.0.1, in four variants.

- plain HTTP;
- htpasswd basic auth;
- TLS with a self-signed CA (the test CA signs the server certificate);
- token auth, with a loopback token server that issues scoped JWTs the way ACR
  does: a token grants exactly the scope asked for, so a pull token cannot push.

Plus a TCP proxy that cuts a connection once after N bytes, to break an upload
mid-blob. Every server is stopped by its context manager; loops are bounded.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from loopback import http_server, json_handler

REGISTRY_BINARY = shutil.which("docker-registry")
SERVICE = "kaitune-test-registry"
ISSUER = "kaitune-test-token-issuer"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Cert:
    cert: Path
    key: Path
    der: bytes
    private_key: rsa.RSAPrivateKey


def make_cert(directory: Path, name: str, ip: str | None = "127.0.0.1") -> Cert:
    """A self-signed certificate that is its own CA (no EKU, so it may sign tokens too)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    if ip:
        import ipaddress

        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip)), x509.DNSName("localhost")])
        builder = builder.add_extension(san, critical=False)
    cert = builder.sign(key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return Cert(cert_path, key_path, cert.public_bytes(serialization.Encoding.DER), key)


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass
class TokenServer:
    """Issues RS256 JWTs for the registry's token auth; records every scope it was asked for."""

    signer: Cert
    users: dict[str, str]
    identity_tokens: set[str] = field(default_factory=set)
    requests: list[dict[str, Any]] = field(default_factory=list)
    url: str = ""

    def issue(self, subject: str, scopes: list[str]) -> str:
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            access.append({"type": kind, "name": name, "actions": [a for a in actions.split(",") if a]})
        now = int(time.time())
        header = {"typ": "JWT", "alg": "RS256", "x5c": [base64.b64encode(self.signer.der).decode()]}
        claims = {"iss": ISSUER, "sub": subject, "aud": SERVICE, "exp": now + 300, "nbf": now - 10, "iat": now,
                  "jti": uuid.uuid4().hex, "access": access}  # fmt: skip
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = self.signer.private_key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input}.{_b64url(signature)}"

    def answer(self, request: BaseHTTPRequestHandler, body: bytes) -> tuple[int, Any]:
        if request.command == "POST":  # the OAuth2 refresh-token grant that ACR's identity tokens use
            form = urllib.parse.parse_qs(body.decode())
            scopes = [s for value in form.get("scope", []) for s in value.split(" ")]
            ok = form.get("grant_type") == ["refresh_token"] and form.get("refresh_token", [""])[0] in (
                self.identity_tokens
            )
            self.requests.append({"method": "POST", "scopes": scopes, "user": "<token>" if ok else None})
            if not ok:
                return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad refresh token"}]}
            return 200, {"access_token": self.issue("identity", scopes)}
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(request.path).query)
        scopes = [s for value in query.get("scope", []) for s in value.split(" ")]
        user = None
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            user = name if self.users.get(name) == password else None
        self.requests.append({"method": "GET", "scopes": scopes, "user": user})
        if user is None:
            return 401, {"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}
        return 200, {"token": self.issue(user, scopes), "expires_in": 300}

    @contextlib.contextmanager
    def serve(self) -> Iterator[TokenServer]:
        with http_server(json_handler(self.answer)) as url:
            self.url = f"{url}/token"
            yield self


@dataclass
class Registry:
    host: str  # 127.0.0.1:PORT
    root: Path
    log: Path
    ca_file: Path | None = None
    token_server: TokenServer | None = None

    def requests(self, method: str, pattern: str) -> int:
        """How many access-log lines show ``method`` on a URI matching ``pattern``."""
        regex = re.compile(rf'"{method} ({pattern})[^"]* HTTP/1\.1"')
        return sum(1 for line in self.log.read_text().splitlines() if regex.search(line))

    def blob_file(self, digest: str) -> Path:
        hexdigest = digest.split(":", 1)[1]
        return self.root / "store/docker/registry/v2/blobs/sha256" / hexdigest[:2] / hexdigest / "data"


@contextlib.contextmanager
def run_registry(
    directory: Path,
    *,
    htpasswd: dict[str, str] | None = None,
    tls: Cert | None = None,
    token_server: TokenServer | None = None,
) -> Iterator[Registry]:
    assert REGISTRY_BINARY, "Debian's docker-registry is not installed (.ci/run installs it)"
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config: dict[str, Any] = {
        "version": 0.1,
        "log": {"level": "info", "formatter": "text"},
        "storage": {"filesystem": {"rootdirectory": str(directory / "store")}, "delete": {"enabled": True}},
        "http": {"addr": f"127.0.0.1:{port}", "secret": uuid.uuid4().hex},
    }
    if tls is not None:
        config["http"]["tls"] = {"certificate": str(tls.cert), "key": str(tls.key)}
    if htpasswd is not None:
        lines = [
            f"{user}:{bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode()}" for user, pw in htpasswd.items()
        ]
        (directory / "htpasswd").write_text("\n".join(lines) + "\n")
        config["auth"] = {"htpasswd": {"realm": "kaitune-test", "path": str(directory / "htpasswd")}}
    if token_server is not None:
        bundle = directory / "token-signer.crt"
        bundle.write_bytes(token_server.signer.cert.read_bytes())
        config["auth"] = {"token": {"realm": token_server.url, "service": SERVICE, "issuer": ISSUER,
                                    "rootcertbundle": str(bundle)}}  # fmt: skip
    (directory / "config.yml").write_text(json.dumps(config))  # JSON is YAML
    log = directory / "registry.log"
    with open(log, "wb") as log_file:
        proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(directory / "config.yml")], stdout=log_file,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
            assert proc.poll() is None, f"docker-registry exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "docker-registry did not start within 20 s"
            time.sleep(0.1)
        yield Registry(f"127.0.0.1:{port}", directory, log, tls.cert if tls else None, token_server)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class CuttingProxy:
    """A TCP proxy to ``upstream`` that drops the first connection whose upload passes ``cut_after`` bytes.

    ``uploaded`` counts every byte clients sent through it (the benchmarks' bytes-on-the-wire figure).
    """

    def __init__(self, upstream: str, cut_after: int | None = None) -> None:
        host, port = upstream.rsplit(":", 1)
        self.upstream = (host, int(port))
        self.cut_after = cut_after
        self.cuts = 0
        self.uploaded = 0
        self._lock = threading.Lock()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.host = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()

    def __enter__(self) -> CuttingProxy:
        self.listener.settimeout(0.2)
        thread = threading.Thread(target=self._accept, daemon=True)
        thread.start()
        self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.listener.close()
        for thread in self._threads:
            thread.join(timeout=5)

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            upstream = socket.create_connection(self.upstream)
            for src, dst, count in ((client, upstream, True), (upstream, client, False)):
                t = threading.Thread(target=self._pump, args=(src, dst, count, client, upstream), daemon=True)
                t.start()
                self._threads.append(t)

    def _pump(self, src: socket.socket, dst: socket.socket, count: bool, *both: socket.socket) -> None:
        sent = 0
        src.settimeout(0.5)
        while not self._stop.is_set():
            try:
                data = src.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break
            if not data:
                break
            sent += len(data)
            if count:
                with self._lock:
                    self.uploaded += len(data)
            if count and self.cut_after is not None and self.cuts == 0 and sent > self.cut_after:
                self.cuts += 1
                for s in both:  # a hard cut, mid-body
                    with contextlib.suppress(OSError):
                        s.shutdown(socket.SHUT_RDWR)
                break
            try:
                dst.sendall(data)
            except OSError:
                break
        for s in both:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
