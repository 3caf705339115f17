"""Adapter push: kaitune's registry client vs stock oras-py 0.2.43, same run, same registry.

A real registry (Debian's docker-registry on 127.0.0.1, started here) in three
variants: plain, htpasswd basic auth, and ACR-style token auth (scoped JWTs). Each push
runs in a fresh process so peak RSS is the push's own.

* kaitune: ``steps.oci.transfer.push`` of Kaito's adapter image (tar+gzip layer
  built from the adapter directory, streamed in 8 MiB chunks).
* baseline: ``oras.provider.Registry().push(files=[adapter_dir])``: oras-py tars
  and gzips the directory into one layer and pushes it with its defaults.

Prints wall time, peak RSS and the bytes each client sent (through a counting proxy), and the ratios.

    python benchmarks/bench_push.py [--mib 256]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from registry_server import CuttingProxy, TokenServer, make_cert, run_registry  # noqa: E402

KAITUNE = r"""
import resource, sys, tempfile
from pathlib import Path
from steps.oci import adapter_image, transfer
from steps.oci.options import RegistryOptions
adapter, target, config = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])  # argv[4]: oras-py's backend
with tempfile.TemporaryDirectory() as staging:
    image = adapter_image.build(adapter, {"sh.kaito.model.name": "bench"}, Path(staging))
    transfer.push(image, target, RegistryOptions(docker_config=config))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""

BASELINE = r"""
import os, resource, sys
import oras.provider
adapter, target, config, backend = sys.argv[1:5]
os.chdir(os.path.dirname(adapter))
registry = oras.provider.Registry(insecure=True, auth_backend=backend)
registry.push(target, files=[os.path.basename(adapter)], config_path=config,
              manifest_annotations={"sh.kaito.model.name": "bench"}, quiet=True)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def timed(code: str, *args: str) -> tuple[float, int] | str:
    """Seconds and peak RSS (MiB) of one push in a fresh process, or why it failed."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        return proc.stderr.strip().splitlines()[-1][:100]
    return elapsed, int(proc.stdout.strip().splitlines()[-1]) // 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=256, help="adapter weights size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kaitune-bench-push-") as scratch:
        work = Path(scratch)
        adapter = work / "adapter"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text("{}")
        with open(adapter / "adapter_model.safetensors", "wb") as fh:
            for _ in range(args.mib):
                fh.write(os.urandom(1 << 20))
        print(f"adapter: {args.mib} MiB of incompressible weights")
        print(f"{'registry':10} {'client':8} {'seconds':>8} {'peak RSS MiB':>13} {'MiB sent':>13}")
        # oras-py's default "token" backend cannot log in to a basic-auth registry: it takes the Basic
        # realm for a token URL. Its "basic" backend is what a user of a basic-auth registry must pick.
        variants = [("plain", {}, "token"), ("htpasswd", {"htpasswd": {"bench": "bench-pass"}}, "basic")]
        signer = make_cert(work / "signer", "token-signer", ip=None)
        with TokenServer(signer, users={"bench": "bench-pass"}).serve() as tokens:
            variants.append(("token", {"token_server": tokens}, "token"))
            for variant, registry_args, backend in variants:
                with run_registry(work / f"registry-{variant}", **registry_args) as registry:  # type: ignore[arg-type]
                    compare(variant, registry.host, adapter, work / f"docker-{variant}.json", backend)


def compare(variant: str, host: str, adapter: Path, config: Path, backend: str) -> None:
    results = {}
    for name, code in (("kaitune", KAITUNE), ("oras-py", BASELINE)):
        with CuttingProxy(host) as proxy:  # counts the bytes each client sends
            auth = base64.b64encode(b"bench:bench-pass").decode()
            config.write_text(json.dumps({"auths": {proxy.host: {"auth": auth}}}))
            outcome = timed(code, str(adapter), f"{proxy.host}/bench/{name}:1", str(config), backend)
            sent = proxy.uploaded / 2**20
        if isinstance(outcome, str):
            print(f"{variant:10} {name:8} FAILED after sending {sent:.1f} MiB: {outcome}")
            continue
        results[name] = (*outcome, sent)
        print(f"{variant:10} {name:8} {outcome[0]:8.2f} {outcome[1]:13d} {sent:13.1f}")
    if len(results) == 2:
        k, o = results["kaitune"], results["oras-py"]
        print(f"{variant:10} {'ratio':8} {o[0] / k[0]:7.2f}x {o[1] / k[1]:12.2f}x {o[2] / k[2]:12.2f}x"
              "  (oras-py / kaitune: >1 means kaitune is better)")  # fmt: skip


if __name__ == "__main__":
    main()
