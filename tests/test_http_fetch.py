"""Downloads against a real loopback HTTP server with injected faults."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from http_faults import Answer, FaultServer, fault_server

from pipelines.errors import BadInput, Transient
from steps.http_fetch import Downloader, FetchPolicy, file_name, redact

BODY = bytes(range(256)) * 4096  # 1 MiB, every byte position distinguishable


@pytest.fixture
def server() -> Iterator[FaultServer]:
    with fault_server() as s:
        yield s


def downloader(sleeps: list[float] | None = None, **policy: float) -> Downloader:
    return Downloader(FetchPolicy(**policy), sleep=(sleeps.append if sleeps is not None else lambda _s: None))  # type: ignore[arg-type]


def test_500_500_then_success(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/d.parquet", Answer(500), Answer(503), Answer(body=BODY))
    sleeps: list[float] = []
    path = downloader(sleeps).fetch(url, tmp_path)
    assert path.read_bytes() == BODY and path.name == "d.parquet"
    assert len(server.requests_for("/d.parquet")) == 3
    assert len(sleeps) == 2 and sleeps[1] > sleeps[0]  # exponential backoff


def test_429_honours_retry_after(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/d.jsonl", Answer(429, headers={"Retry-After": "7"}), Answer(body=b"{}\n"))
    sleeps: list[float] = []
    downloader(sleeps).fetch(url, tmp_path)
    assert 7 <= sleeps[0] < 7.8


def test_reset_mid_body_resumes_with_range(server: FaultServer, tmp_path: Path) -> None:
    url = server.route(
        "/big.parquet",
        Answer(body=BODY, cut_after=300_000, headers={"ETag": '"v1"'}),
        Answer(body=BODY, headers={"ETag": '"v1"'}),
    )
    path = downloader().fetch(url, tmp_path)
    assert path.read_bytes() == BODY  # byte-identical
    first, second = server.requests_for("/big.parquet")
    assert "Range" not in first.headers
    assert second.headers["Range"] == "bytes=300000-" and second.headers["If-Range"] == '"v1"'


def test_server_ignoring_range_restarts_cleanly(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/big.parquet", Answer(body=BODY, cut_after=100_000), Answer(body=BODY, ignore_range=True))
    path = downloader().fetch(url, tmp_path)
    assert path.read_bytes() == BODY
    assert server.requests_for("/big.parquet")[1].headers["Range"] == "bytes=100000-"


def test_slow_body_times_out_and_is_transient(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/slow.parquet", Answer(body=BODY, delay=1.5))
    with pytest.raises(Transient, match="timed out"):
        downloader(attempts=2, read_timeout=0.3).fetch(url, tmp_path)
    assert list(tmp_path.glob("slow.parquet")) == []


def test_404_is_not_retried(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/missing.parquet", Answer(404, b"nope"))
    with pytest.raises(BadInput, match="HTTP 404") as info:
        downloader().fetch(url, tmp_path)
    assert len(server.requests_for("/missing.parquet")) == 1
    assert info.value.problems[0].path == url


def test_redirect_loop_is_detected(server: FaultServer, tmp_path: Path) -> None:
    server.route("/a", Answer(302, location="/b"))
    url = server.route("/b", Answer(302, location="/a"))
    with pytest.raises(BadInput, match="loop"):
        downloader().fetch(url, tmp_path)


def test_redirects_are_followed_and_drop_auth_on_another_host(server: FaultServer, tmp_path: Path) -> None:
    final = server.route("/real.parquet", Answer(body=b"PAR1"))
    # 127.0.0.1 and localhost are different hosts to the client.
    other = final.replace("127.0.0.1", "localhost")
    url = server.route("/start", Answer(302, location=other))
    d = Downloader(FetchPolicy(), token="s3cr3t-token", sleep=lambda _s: None)
    path = d.fetch(url, tmp_path)
    assert path.read_bytes() == b"PAR1" and path.name == "real.parquet"
    assert server.requests_for("/start")[0].headers["Authorization"] == "Bearer s3cr3t-token"
    assert "Authorization" not in server.requests_for("/real.parquet")[0].headers


def test_short_body_is_retried_then_fails_transient(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/short.parquet", Answer(body=BODY, short_by=10, ignore_range=True))
    with pytest.raises(Transient, match="bytes"):
        downloader(attempts=3).fetch(url, tmp_path)
    assert not (tmp_path / "short.parquet").exists()


def test_sha256_mismatch_leaves_no_file(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/d.parquet", Answer(body=BODY)) + "#sha256=" + "0" * 64
    with pytest.raises(BadInput, match="sha256 mismatch"):
        downloader().fetch(url, tmp_path)
    assert list(tmp_path.iterdir()) == []
    good = server.route("/d.parquet", Answer(body=BODY)) + "#sha256=" + hashlib.sha256(BODY).hexdigest()
    assert downloader().fetch(good, tmp_path).read_bytes() == BODY


def test_seed_url_shape_saves_a_parquet_file(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/datasets/x/resolve/main/data/train-00000-of-00001.parquet", Answer(body=b"PAR1"))
    assert downloader().fetch(url + "?download=true", tmp_path).name == "train-00000-of-00001.parquet"


def test_content_disposition_names_the_file(server: FaultServer, tmp_path: Path) -> None:
    url = server.route(
        "/download",
        Answer(body=b"{}", headers={"Content-Disposition": "attachment; filename*=UTF-8''train%20set.jsonl"}),
    )
    assert downloader().fetch(url, tmp_path).name == "train_set.jsonl"
    assert file_name("http://h/x", 'attachment; filename="../../etc/passwd"') == "passwd"


def test_rerun_reuses_the_finished_download(server: FaultServer, tmp_path: Path) -> None:
    url = server.route("/d.parquet", Answer(body=BODY))
    downloader().fetch(url, tmp_path)
    downloader().fetch(url, tmp_path)
    assert len(server.requests_for("/d.parquet")) == 1


def test_secrets_are_redacted_from_urls() -> None:
    url = "https://user:pw@acct.blob.core.windows.net/c/d.parquet?sv=2024&sig=abc123&download=true"
    text = redact(url)
    assert "pw" not in text and "abc123" not in text and "download=true" in text


def test_registry_down_fails_fast_and_transient(tmp_path: Path) -> None:
    with fault_server() as s:
        url = s.url + "/gone.parquet"
    with pytest.raises(Transient, match="connection failed"):
        downloader(attempts=2).fetch(url, tmp_path)


def test_token_never_reaches_the_log(server: FaultServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = server.route("/d.parquet", Answer(500), Answer(body=b"x"))
    Downloader(FetchPolicy(), token="s3cr3t-token", sleep=lambda _s: None).fetch(url, tmp_path)
    assert "s3cr3t" not in caplog.text
    assert "s3cr3t" not in json.dumps([p.read_text() for p in tmp_path.glob("*.json")])
