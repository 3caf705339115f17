"""Download an http(s) URL to disk: streamed, resumable, verified, with bounded retries.

* constant memory: the body is streamed to ``NAME.partial`` and renamed only when
  complete (length checked against Content-Length, optional sha256 verified);
* a dropped connection resumes with ``Range`` (``If-Range`` pins the same version); a
  server that ignores Range restarts the file cleanly;
* 5xx, 408, 429 (``Retry-After`` honoured), timeouts and resets are retried with
  exponential backoff; other 4xx fail at once as bad input;
* redirects are followed by hand, at most ``max_redirects``, loops detected, and the
  ``Authorization`` header is dropped when a redirect leaves the original host;
* a finished download is recorded beside the file and reused by a rerun.

The token (for gated datasets) comes from a mounted file and never reaches a log line.
"""

from __future__ import annotations

import contextlib
import email.utils
import hashlib
import http.client
import json
import logging
import os
import random
import re
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlencode, urljoin, urlsplit, urlunsplit

from pipelines.errors import BadInput, Problem, Transient

log = logging.getLogger("kaitune")
CHUNK = 1 << 20
_SECRET_QUERY = re.compile(r"sig|signature|token|key|secret|credential|x-amz-|se$|sp$|sv$", re.IGNORECASE)


@dataclass(frozen=True)
class FetchPolicy:
    attempts: int = 5
    backoff: float = 1.0  # seconds before the first retry; doubles each time, with jitter
    max_backoff: float = 30.0
    read_timeout: float = 30.0  # per blocking read or connect
    total_timeout: float = 3600.0
    max_redirects: int = 10


class _Retry(Exception):
    """A transient failure; ``wait`` overrides the backoff (Retry-After)."""

    def __init__(self, reason: str, wait: float | None = None) -> None:
        super().__init__(reason)
        self.wait = wait


def redact(url: str) -> str:
    """The URL as it may appear in logs and errors: no userinfo, no signed query values."""
    parts = urlsplit(url)
    query = urlencode([(k, "REDACTED" if _SECRET_QUERY.search(k) else v) for k, v in parse_qsl(parts.query)])
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, query, ""))


def expected_sha256(url: str, explicit: str | None = None) -> str | None:
    """From the spec, or a ``#sha256=HEX`` URL fragment."""
    fragment = dict(parse_qsl(urlsplit(url).fragment))
    value = explicit or fragment.get("sha256")
    if value is None:
        return None
    value = value.lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", value):
        raise BadInput(Problem(redact(url), f"sha256 {value!r} is not 64 hex digits", "fix the checksum"))
    return value


def file_name(url: str, content_disposition: str | None = None) -> str:
    """Content-Disposition's filename, else the URL path's last part (query stripped); never a path."""
    name = ""
    if content_disposition:
        match = re.search(r"filename\*\s*=\s*(?:UTF-8|utf-8)''([^;]+)", content_disposition) or re.search(
            r'filename\s*=\s*"?([^";]+)"?', content_disposition
        )
        if match:
            name = unquote(match.group(1).strip())
    name = name or unquote(urlsplit(url).path).rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9._-]", "_", name.replace("\\", "/").rsplit("/", 1)[-1]).lstrip(".")
    return name or "download"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    with contextlib.suppress(TypeError, ValueError):
        when = email.utils.parsedate_to_datetime(value)
        return max(0.0, when.timestamp() - time.time())
    return None


class Downloader:
    def __init__(
        self,
        policy: FetchPolicy | None = None,
        *,
        token: str | None = None,
        ca_file: str | None = None,
        on_progress: Callable[[int, int | None], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.policy = policy or FetchPolicy()
        self._token = token
        self._ssl = ssl.create_default_context(cafile=ca_file)
        self.on_progress = on_progress or (lambda _done, _total: None)
        self.sleep = sleep

    # -- one HTTP exchange, redirects followed by hand --------------------------------------------------------
    def _open(self, url: str, headers: dict[str, str]) -> tuple[http.client.HTTPResponse, str]:
        origin = urlsplit(url).hostname
        seen = {url}
        for _ in range(self.policy.max_redirects + 1):
            parts = urlsplit(url)
            send = dict(headers)
            if self._token and parts.hostname == origin:
                send["Authorization"] = f"Bearer {self._token}"
            conn_cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            kwargs: dict[str, Any] = {"timeout": self.policy.read_timeout}
            if parts.scheme == "https":
                kwargs["context"] = self._ssl
            conn = conn_cls(parts.hostname or "", parts.port, **kwargs)
            path = urlunsplit(("", "", parts.path or "/", parts.query, ""))
            conn.request("GET", path, headers={"User-Agent": "kaitune", "Accept-Encoding": "identity", **send})
            resp = conn.getresponse()
            if resp.status in (301, 302, 303, 307, 308):
                location = resp.getheader("Location")
                resp.close()
                conn.close()
                if not location:
                    raise BadInput(Problem(redact(url), f"answered {resp.status} without a Location", "check the URL"))
                url = urljoin(url, location)
                if url in seen:
                    raise BadInput(Problem(redact(url), "redirects in a loop", "check the URL with curl -IL"))
                seen.add(url)
                continue
            return resp, url
        raise BadInput(
            Problem(
                redact(url), f"redirected more than {self.policy.max_redirects} times", "check the URL with curl -IL"
            )
        )

    # -- the download ----------------------------------------------------------------------------------------
    def fetch(self, url: str, dest_dir: Path, *, sha256: str | None = None) -> Path:
        """Download ``url`` into ``dest_dir`` and return the file; reuse a finished earlier download."""
        dest_dir.mkdir(parents=True, exist_ok=True)
        want = expected_sha256(url, sha256)
        done = self._finished(url, dest_dir, want)
        if done is not None:
            log.info("reusing %s (downloaded earlier)", done.name)
            return done
        deadline = time.monotonic() + self.policy.total_timeout
        state: dict[str, Any] = {}
        last = ""
        for attempt in range(1, self.policy.attempts + 1):
            try:
                return self._attempt(url, dest_dir, want, state, deadline)
            except _Retry as exc:
                last = str(exc)
                delay = exc.wait if exc.wait is not None else self.policy.backoff * 2 ** (attempt - 1)
                delay = min(delay, self.policy.max_backoff) * (1 + random.uniform(0, 0.1))
                if attempt == self.policy.attempts or time.monotonic() + delay > deadline:
                    break
                log.warning("%s: %s; retry %d/%d in %.1fs", redact(url), last, attempt, self.policy.attempts - 1, delay)
                self.sleep(delay)
        raise Transient(f"download of {redact(url)} failed after {attempt} attempts: {last}")

    def _finished(self, url: str, dest_dir: Path, want: str | None) -> Path | None:
        for meta_path in dest_dir.glob("*.kaitune-download.json"):
            meta = json.loads(meta_path.read_text())
            target = dest_dir / meta["file"]
            same = meta.get("url") == redact(url) and target.exists() and target.stat().st_size == meta["size"]
            if same and (want is None or meta["sha256"] == want):
                return target
        return None

    def _attempt(self, url: str, dest_dir: Path, want: str | None, state: dict[str, Any], deadline: float) -> Path:
        partial: Path | None = state.get("partial")
        offset = partial.stat().st_size if partial is not None and partial.exists() else 0
        headers = {}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if state.get("validator"):
                headers["If-Range"] = state["validator"]
        try:
            resp, final_url = self._open(url, headers)
        except TimeoutError as exc:
            raise _Retry(f"timed out connecting ({exc})") from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            if isinstance(exc, ssl.SSLCertVerificationError):
                raise BadInput(
                    Problem(
                        redact(url),
                        f"TLS verification failed: {exc.verify_message}",
                        "fix the server certificate or pass a CA bundle",
                    )
                ) from None
            raise _Retry(f"connection failed ({exc})") from None
        with contextlib.closing(resp):
            status = resp.status
            if status in (408, 429) or status >= 500:
                raise _Retry(f"HTTP {status}", _retry_after(resp.getheader("Retry-After")))
            if status == 416 and offset:
                partial.unlink()  # type: ignore[union-attr]
                raise _Retry("the server refused the resume range; restarting", 0)
            if status >= 400:
                fix = "the dataset is gated: provide a token secret" if status in (401, 403) else "check the URL"
                raise BadInput(Problem(redact(url), f"answered HTTP {status} {resp.reason}", fix))
            if "partial" not in state:
                name = file_name(final_url, resp.getheader("Content-Disposition"))
                state["partial"] = partial = dest_dir / f"{name}.partial"
                partial.unlink(missing_ok=True)
            assert partial is not None
            state["validator"] = resp.getheader("ETag") or resp.getheader("Last-Modified")
            if status == 206 and offset:
                start, total = _content_range(resp.getheader("Content-Range"))
                if start != offset:
                    partial.unlink()
                    raise _Retry(f"the server resumed at byte {start}, not {offset}; restarting", 0)
                mode = "ab"
            else:
                if offset:
                    log.info("%s ignored the Range request; restarting from byte 0", redact(url))
                offset, mode = 0, "wb"
                length = resp.getheader("Content-Length")
                total = int(length) if length is not None else None
            return self._stream(resp, url, partial, mode, offset, total, want, deadline)

    def _stream(
        self,
        resp: http.client.HTTPResponse,
        url: str,
        partial: Path,
        mode: str,
        offset: int,
        total: int | None,
        want: str | None,
        deadline: float,
    ) -> Path:
        written = offset
        try:
            with open(partial, mode) as fh:
                while True:
                    if time.monotonic() > deadline:
                        raise Transient(f"download of {redact(url)} exceeded {self.policy.total_timeout:.0f}s")
                    chunk = resp.read(CHUNK) if total is None else resp.read(min(CHUNK, total - written))
                    if not chunk:
                        break
                    fh.write(chunk)
                    written += len(chunk)
                    self.on_progress(written, total)
                    if total is not None and written >= total:
                        break
        except TimeoutError:
            raise _Retry(f"read timed out after {written} bytes") from None
        except (ConnectionError, http.client.HTTPException, OSError) as exc:
            raise _Retry(f"connection dropped after {written} bytes ({exc.__class__.__name__})") from None
        if total is not None and written < total:
            raise _Retry(f"body ended after {written} of {total} bytes")
        digest = _sha256_file(partial)
        if want is not None and digest != want:
            partial.unlink()
            raise BadInput(
                Problem(
                    redact(url),
                    f"sha256 mismatch: expected {want}, got {digest}",
                    "check the checksum, or whether the file changed upstream",
                )
            )
        final = partial.with_name(partial.name.removesuffix(".partial"))
        os.replace(partial, final)
        meta = {"url": redact(url), "file": final.name, "size": written, "sha256": digest}
        (final.parent / f"{final.name}.kaitune-download.json").write_text(json.dumps(meta) + "\n")
        log.info("downloaded %s (%d bytes, sha256 %s)", final.name, written, digest[:12])
        return final


def _content_range(value: str | None) -> tuple[int, int | None]:
    match = re.match(r"bytes (\d+)-(\d+)/(\d+|\*)", value or "")
    if not match:
        raise _Retry(f"unusable Content-Range {value!r}", 0)
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h.hexdigest()


def read_token(path: str | None) -> str | None:
    """A bearer token from a mounted secret file; empty or absent means none."""
    if not path:
        return None
    try:
        token = Path(path).read_text().strip()
    except FileNotFoundError:
        return None
    if any(c.isspace() for c in token):
        raise BadInput(
            Problem(
                "dataset token",
                "the token file holds whitespace inside the token",
                "store only the token in the secret",
            )
        )
    return token or None


def terminal_progress() -> Callable[[int, int | None], None] | None:
    """A rich progress bar when stderr is a terminal; None otherwise (logs and Argo progress only)."""
    if not sys.stderr.isatty():
        return None
    from rich.progress import DownloadColumn, Progress, TransferSpeedColumn

    bar = Progress(*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn(), transient=True)
    bar.start()
    task = bar.add_task("download", total=None)

    def update(done: int, total: int | None) -> None:
        bar.update(task, completed=done, total=total)
        if total is not None and done >= total:
            bar.stop()

    return update
