"""Stream an http(s) URL to disk with bounded retries; never a half file under the final name."""

from __future__ import annotations

import logging
import os
import re
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlsplit

from pipelines.errors import BadInput, Problem, Transient

log = logging.getLogger("kaitune")
CHUNK = 1 << 20


def file_name(url: str, content_disposition: str | None = None) -> str:
    """Content-Disposition's filename, else the URL path's last part (query stripped)."""
    if content_disposition:
        match = re.search(r"filename\*?=(?:UTF-8'')?\"?([^\";]+)\"?", content_disposition)
        if match:
            return Path(unquote(match.group(1))).name
    name = Path(unquote(urlsplit(url).path)).name
    return name or "download"


def fetch(url: str, dest_dir: Path, *, attempts: int = 4, timeout: float = 30.0, backoff: float = 1.0) -> Path:
    """Download ``url`` into ``dest_dir``; 4xx is bad input, exhausted retries are transient."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        try:
            with urllib.request.urlopen(urllib.request.Request(url), timeout=timeout) as resp:
                final = dest_dir / file_name(url, resp.headers.get("Content-Disposition"))
                partial = final.with_name(final.name + ".partial")
                expected = resp.headers.get("Content-Length")
                size = 0
                with open(partial, "wb") as fh:
                    while chunk := resp.read(CHUNK):
                        fh.write(chunk)
                        size += len(chunk)
                if expected is not None and size != int(expected):
                    raise ConnectionError(f"got {size} of {expected} bytes")
                os.replace(partial, final)
                log.info("downloaded %s (%d bytes)", final.name, size)
                return final
        except urllib.error.HTTPError as exc:
            if 400 <= exc.code < 500 and exc.code != 429:
                raise BadInput(
                    Problem(
                        url,
                        f"answered HTTP {exc.code} {exc.reason}",
                        "check the URL, and for a gated dataset provide a token",
                    )
                ) from None
            last = exc
        except (urllib.error.URLError, TimeoutError, ConnectionError, OSError) as exc:
            last = exc
        if attempt < attempts:
            delay = backoff * 2 ** (attempt - 1)
            log.warning("download of %s failed (%s); retry %d/%d in %.0fs", url, last, attempt, attempts - 1, delay)
            time.sleep(delay)
    raise Transient(f"download of {url} failed after {attempts} attempts: {last}")
