"""Push and pull against a real registry (Debian's docker-registry on 127.0.0.1): auth, TLS and faults."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_server import (
    REGISTRY_BINARY,
    CuttingProxy,
    Registry,
    TokenServer,
    free_port,
    make_cert,
    run_registry,
)

from pipelines.errors import BadInput, Transient
from steps.oci import adapter_image, transfer
from steps.oci.credentials import Credentials
from steps.oci.options import RegistryOptions, RetryPolicy
from steps.oci.registry import RegistryClient

# CI installs the registry, so there a missing binary fails the tests instead of skipping them.
pytestmark = pytest.mark.skipif(
    REGISTRY_BINARY is None and not os.environ.get("CI"), reason="Debian's docker-registry is not installed"
)

USER, PASSWORD = "kaitune", "s3cret-Pa55word"


def adapter(tmp_path: Path, size: int = 600_000, seed: int = 0) -> Path:
    out = tmp_path / f"adapter-{seed}"
    out.mkdir()
    (out / "adapter_config.json").write_text('{"base_model_name_or_path": "kaitune/tiny-phi3", "r": 8}')
    # Incompressible, so the gzip layer is as big as the adapter and uploads take several chunks.
    (out / "adapter_model.safetensors").write_bytes(os.urandom(size) if seed == 0 else bytes([seed]) * size)
    (out / "tokenizer.json").write_text('{"version": "1.0"}')
    return out


def docker_config(tmp_path: Path, host: str, user: str = USER, password: str = PASSWORD) -> Path:
    path = tmp_path / "docker" / "config.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    auth = base64.b64encode(f"{user}:{password}".encode()).decode()
    path.write_text(json.dumps({"auths": {host: {"auth": auth}}}))
    return path


def push_step(adapter_dir: Path, out: Path, image: str, *extra: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "steps.push", "--adapter-dir", str(adapter_dir), "--model-name", "tiny-phi3",
           "--image", image, "--outputs", str(out), *extra]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def kaitune(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], capture_output=True, text=True, timeout=120)


def outputs(out: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in out.iterdir()}


@pytest.fixture
def plain(tmp_path: Path) -> Iterator[Registry]:
    with run_registry(tmp_path / "registry") as registry:
        yield registry


def test_push_then_pull_round_trip_and_interop_with_skopeo(tmp_path: Path, plain: Registry) -> None:
    registry = plain
    source = adapter(tmp_path)
    result = push_step(source, tmp_path / "out", f"{registry.host}/adapters/tiny:0.1")
    assert result.returncode == 0, result.stderr
    got = outputs(tmp_path / "out")
    digest = got["digest"]
    assert got["image-ref"] == f"{registry.host}/adapters/tiny@{digest}" and got["tag"] == "0.1"

    # A standard tool reads what kaitune pushed, with Kaito's annotations and layout.
    raw = subprocess.run(["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/adapters/tiny:0.1"],
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    manifest = json.loads(raw.stdout)
    assert manifest["annotations"]["sh.kaito.model.name"] == "tiny-phi3"
    assert [layer["mediaType"] for layer in manifest["layers"]] == ["application/vnd.oci.image.layer.v1.tar+gzip"]

    pulled = kaitune("pull", got["image-ref"], str(tmp_path / "pulled"))
    assert pulled.returncode == 0, pulled.stderr
    for name in ("adapter_config.json", "adapter_model.safetensors", "tokenizer.json"):
        assert (tmp_path / "pulled" / name).read_bytes() == (source / name).read_bytes()

    # ... and kaitune reads what skopeo pushed (a copy under another name).
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false",
                    f"docker://{registry.host}/adapters/tiny:0.1", f"docker://{registry.host}/copies/tiny:c"],
                   capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    copy = transfer.pull(f"{registry.host}/copies/tiny:c", tmp_path / "copy")
    assert (tmp_path / "copy" / "adapter_model.safetensors").read_bytes() == (
        source / "adapter_model.safetensors"
    ).read_bytes()
    assert copy.annotations["sh.kaito.model.name"] == "tiny-phi3"


def test_re_push_uploads_no_blob_and_gives_the_same_digest(tmp_path: Path, plain: Registry) -> None:
    registry = plain
    source = adapter(tmp_path)
    first = push_step(source, tmp_path / "a", f"{registry.host}/adapters/tiny:1")
    assert first.returncode == 0, first.stderr
    uploads = registry.requests("POST", r"/v2/adapters/tiny/blobs/uploads/")
    writes = registry.requests("PUT", r"/v2/adapters/tiny/blobs/uploads/\S+")
    assert uploads == 2 and writes == 2  # the layer and the config
    again = push_step(source, tmp_path / "b", f"{registry.host}/adapters/tiny:1")
    assert again.returncode == 0, again.stderr
    assert registry.requests("POST", r"/v2/adapters/tiny/blobs/uploads/") == uploads
    assert registry.requests("PUT", r"/v2/adapters/tiny/blobs/uploads/\S+") == writes
    assert outputs(tmp_path / "a")["digest"] == outputs(tmp_path / "b")["digest"]


def test_htpasswd_basic_auth_sends_credentials_up_front(tmp_path: Path) -> None:
    with run_registry(tmp_path / "registry", htpasswd={USER: PASSWORD}) as registry:
        config = docker_config(tmp_path, registry.host)
        result = push_step(
            adapter(tmp_path), tmp_path / "out", f"{registry.host}/a/b:1", "--docker-config", str(config)
        )
        assert result.returncode == 0, result.stderr
        # Upload bodies went once: no PUT or PATCH with a body was answered 401.
        assert registry.requests("PUT", r"/v2/a/b/blobs/uploads/\S+") == 2
        log = registry.log.read_text()
        assert not [line for line in log.splitlines() if ('"PUT ' in line or '"PATCH ' in line) and '" 401 ' in line]

        pulled = kaitune("pull", f"{registry.host}/a/b:1", str(tmp_path / "p"), "--docker-config", str(config))
        assert pulled.returncode == 0, pulled.stderr

        nothing = kaitune(
            "pull", f"{registry.host}/a/b:1", str(tmp_path / "q"), "--docker-config", str(tmp_path / "none.json")
        )
        assert nothing.returncode == 2 and "does not exist" in nothing.stderr


def test_wrong_password_fails_fast_and_never_shows_the_secret(tmp_path: Path) -> None:
    wrong = "Wr0ng-Secret-Value"
    with run_registry(tmp_path / "registry", htpasswd={USER: PASSWORD}) as registry:
        config = docker_config(tmp_path, registry.host, password=wrong)
        start = time.monotonic()
        result = push_step(
            adapter(tmp_path), tmp_path / "out", f"{registry.host}/a/b:1", "--docker-config", str(config)
        )
        elapsed = time.monotonic() - start
        assert result.returncode == 2, result.stderr
        assert "rejected the credentials" in result.stderr and "Traceback" not in result.stderr
        encoded = base64.b64encode(f"{USER}:{wrong}".encode()).decode()
        assert wrong not in result.stderr + result.stdout and encoded not in result.stderr + result.stdout
        assert elapsed < 2 + 1.5, elapsed  # < 2 s of registry time, plus the interpreter's start
        assert not (tmp_path / "out").exists()


def test_missing_credentials_say_how_to_log_in(tmp_path: Path) -> None:
    with run_registry(tmp_path / "registry", htpasswd={USER: PASSWORD}) as registry:
        client = RegistryClient(registry.host, credentials=None)
        client.credentials = None
        with pytest.raises(BadInput, match="needs credentials"):
            client.has_blob("a/b", "sha256:" + "0" * 64)


def test_tls_registry_needs_its_ca_and_never_skips_verification(tmp_path: Path) -> None:
    cert = make_cert(tmp_path / "tls", "registry-ca")
    with run_registry(tmp_path / "registry", tls=cert) as registry:
        ref = f"{registry.host}/secure/tiny:1"
        refused = push_step(adapter(tmp_path), tmp_path / "o1", ref)
        assert refused.returncode == 2 and "TLS verification failed" in refused.stderr and "--ca-file" in refused.stderr
        ok = push_step(adapter(tmp_path, seed=2), tmp_path / "o2", ref, "--ca-file", str(cert.cert))
        assert ok.returncode == 0, ok.stderr
        pulled = kaitune("pull", ref, str(tmp_path / "p"), "--ca-file", str(cert.cert))
        assert pulled.returncode == 0, pulled.stderr


def test_token_auth_gets_a_push_scoped_token_after_a_pull(tmp_path: Path) -> None:
    """ACR's flow: a pull-scoped token must not be reused for push (oras-py 0.2.43 does, and fails)."""
    signer = make_cert(tmp_path / "signer", "token-signer", ip=None)
    with (
        TokenServer(signer, users={USER: PASSWORD}).serve() as tokens,
        run_registry(tmp_path / "registry", token_server=tokens) as registry,
    ):
        options = RegistryOptions(retry=RetryPolicy(attempts=2))
        creds = Credentials(USER, PASSWORD, source="test")
        client = RegistryClient(registry.host, options, creds)
        assert client.has_blob("team/tiny", "sha256:" + "0" * 64) is False  # takes a pull-scoped token
        image = adapter_image.build(adapter(tmp_path), {"sh.kaito.model.name": "t"}, tmp_path / "staging")
        for blob in (image.layer, image.config):
            assert client.push_blob("team/tiny", blob) is True
        client.put_manifest("team/tiny", "1", image.manifest)
        # Every request carried a token for its scope: the only 401 is the first ping's challenge.
        refused = [line for line in registry.log.read_text().splitlines() if '" 401 ' in line]
        assert len(refused) == 1 and '"GET /v2/ ' in refused[0], refused
        # oras-py's own methods run on the same transport (do_request is overridden), auth included.
        assert client.get_tags("team/tiny") == ["1"]
        asked = [r["scopes"] for r in tokens.requests]
        assert ["repository:team/tiny:pull"] in asked
        assert any("repository:team/tiny:pull,push" in scopes for scopes in asked)

        config = docker_config(tmp_path, registry.host)
        got = kaitune("pull", f"{registry.host}/team/tiny:1", str(tmp_path / "p"), "--docker-config", str(config))
        assert got.returncode == 0, got.stderr

        bad = docker_config(tmp_path, registry.host, password="nope-nope")
        start = time.monotonic()
        denied = kaitune("pull", f"{registry.host}/team/tiny:1", str(tmp_path / "q"), "--docker-config", str(bad))
        assert denied.returncode == 2 and "token server" in denied.stderr and "nope-nope" not in denied.stderr
        assert time.monotonic() - start < 3.5


def test_identity_token_uses_the_oauth2_refresh_grant(tmp_path: Path) -> None:
    signer = make_cert(tmp_path / "signer", "token-signer", ip=None)
    refresh = "acr-refresh-token-value"
    with (
        TokenServer(signer, users={}, identity_tokens={refresh}).serve() as tokens,
        run_registry(tmp_path / "registry", token_server=tokens) as registry,
    ):
        config = tmp_path / "docker" / "config.json"
        config.parent.mkdir()
        identity = {"auth": base64.b64encode(b"00000000-0000-0000-0000-000000000000:").decode(),
                    "identitytoken": refresh}  # fmt: skip
        config.write_text(json.dumps({"auths": {registry.host: identity}}))
        result = push_step(
            adapter(tmp_path), tmp_path / "out", f"{registry.host}/x/y:1", "--docker-config", str(config)
        )
        assert result.returncode == 0, result.stderr
        assert {r["method"] for r in tokens.requests} == {"POST"}


def test_registry_down_is_transient_and_quick(tmp_path: Path) -> None:
    start = time.monotonic()
    result = push_step(adapter(tmp_path), tmp_path / "out", f"127.0.0.1:{free_port()}/a/b:1")
    elapsed = time.monotonic() - start
    assert result.returncode == 75, result.stderr
    assert "connection refused" in result.stderr and "Traceback" not in result.stderr
    assert elapsed < 30, elapsed


def test_upload_cut_mid_blob_restarts_cleanly(tmp_path: Path, plain: Registry) -> None:
    registry = plain
    source = adapter(tmp_path, size=700_000)
    image = adapter_image.build(source, {}, tmp_path / "staging")
    with CuttingProxy(registry.host, cut_after=300_000) as proxy:
        # The proxy's host is a loopback name, so plain HTTP is chosen as for the registry itself.
        options = RegistryOptions(chunk_size=128 << 10, retry=RetryPolicy(backoff_s=0.05))
        result = transfer.push(image, f"{proxy.host}/cut/tiny:1", options)
        assert proxy.cuts == 1
    assert result.uploaded == [image.layer.digest, image.config.digest]
    pulled = transfer.pull(f"{registry.host}/cut/tiny@{result.digest}", tmp_path / "p")
    assert pulled.digest == image.manifest.digest
    assert (tmp_path / "p" / "adapter_model.safetensors").read_bytes() == (
        source / "adapter_model.safetensors"
    ).read_bytes()


def test_a_blob_corrupted_in_storage_is_caught_on_pull(tmp_path: Path, plain: Registry) -> None:
    registry = plain
    result = push_step(adapter(tmp_path), tmp_path / "out", f"{registry.host}/c/tiny:1")
    assert result.returncode == 0, result.stderr
    manifest = json.loads(subprocess.run(
        ["skopeo", "inspect", "--raw", "--tls-verify=false", f"docker://{registry.host}/c/tiny:1"],
        capture_output=True, text=True, timeout=60, check=True).stdout)  # fmt: skip
    blob = registry.blob_file(manifest["layers"][0]["digest"])
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one bit pattern changed
    blob.write_bytes(bytes(data))
    pulled = kaitune("pull", f"{registry.host}/c/tiny:1", str(tmp_path / "p"))
    assert pulled.returncode == 2 and "corrupt" in pulled.stderr, pulled.stderr
    assert not (tmp_path / "p").exists()


def test_upload_memory_stays_within_a_chunk(tmp_path: Path, plain: Registry) -> None:
    registry = plain
    big = tmp_path / "big.bin"
    with open(big, "wb") as fh:
        for _ in range(48):
            fh.write(os.urandom(1 << 20))
    from steps.oci.blobs import Blob, file_digest

    blob = Blob("application/octet-stream", file_digest(big), big.stat().st_size, path=big)
    client = RegistryClient(registry.host, RegistryOptions(chunk_size=4 << 20))
    tracemalloc.start()
    try:
        assert client.push_blob("mem/test", blob) is True
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"peak {peak / 2**20:.1f} MiB for a 48 MiB blob"
    assert client.has_blob("mem/test", blob.digest)


def test_bad_references_are_clear_errors(tmp_path: Path) -> None:
    result = kaitune("pull", "ACR_REPO_HERE.azurecr.io/x:1", str(tmp_path / "p"))
    assert result.returncode == 2 and "not a valid hostname" in result.stderr
    with pytest.raises(Transient):
        transfer.pull(f"127.0.0.1:{free_port()}/a/b:1", tmp_path / "q", RegistryOptions(retry=RetryPolicy(attempts=1)))


def test_fetch_data_pulls_a_dataset_image_with_its_pull_secret(tmp_path: Path) -> None:
    rows = [
        {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(30)
    ]
    shard = tmp_path / "train.jsonl"
    shard.write_text("".join(json.dumps(r) + "\n" for r in rows))
    image = adapter_image.build_from_files([shard], {}, tmp_path / "staging")
    with run_registry(tmp_path / "registry", htpasswd={USER: PASSWORD}) as registry:
        config = docker_config(tmp_path, registry.host)
        ref = f"{registry.host}/datasets/chat:1"
        transfer.push(image, ref, RegistryOptions(docker_config=config))
        result = subprocess.run(
            [sys.executable, "-m", "steps.fetch_data", "--input-kind", "image", "--input-image", ref,
             "--work", str(tmp_path / "work"), "--outputs", str(tmp_path / "out"), "--training-config", "{}"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "DOCKER_CONFIG": str(config.parent)},
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "out" / "rows").read_text() == "30"
        empty = tmp_path / "no-login"
        empty.mkdir()
        no_login = subprocess.run(
            [sys.executable, "-m", "steps.fetch_data", "--input-kind", "image", "--input-image", ref,
             "--work", str(tmp_path / "w2"), "--outputs", str(tmp_path / "o2"), "--training-config", "{}"],
            capture_output=True, text=True, timeout=300, env={**os.environ, "DOCKER_CONFIG": str(empty)},
        )  # fmt: skip
        assert no_login.returncode == 2 and "needs credentials" in no_login.stderr, no_login.stderr
        assert "imagePushSecret" in no_login.stderr or "docker login" in no_login.stderr
