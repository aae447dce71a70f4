"""A Google Cloud Storage emulator on 127.0.0.1 for tests of gs:// paths (a real server that
speaks GCS's JSON API, not a mock): started once per session, stopped by its PID.

Programs under test reach it through the environment of `Emulator.env()` (their subprocess's
environment: the variables must be set before fsspec or tensorstore is imported). The test
process itself talks to it over plain HTTP (`upload`, `names`, `read`, `copy`), so that no
cloud library's global state leaks into it.

One gap of the emulator is closed here, as GCS behaves: its media downloads lack the
`x-goog-generation` header, from which tensorstore takes an object's generation (without it,
orbax's OCDBT manifest reads fail with "Malformed StorageGeneration" and a multi-process save
never completes). Run as a program, this module serves the emulator with that header added.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

BUCKET = "bucket"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Emulator:
    url: str  # http://127.0.0.1:PORT
    process: subprocess.Popen

    def env(self, base: dict[str, str]) -> dict[str, str]:
        """`base` plus what points every GCS client at the emulator, with no credential lookup
        and no metadata-server probe off this machine."""
        env = dict(base)
        env.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
        env.update(
            STORAGE_EMULATOR_HOST=self.url,  # gcsfs (epath), google-cloud-storage (tensorboardX)
            TENSORSTORE_GCS_HTTP_URL=self.url,  # tensorstore's gcs driver (orbax's arrays)
            GOOGLE_AUTH_TOKEN_FOR_TESTING="x",  # tensorstore: no credential lookup
            FSSPEC_GCS_TOKEN="anon",  # gcsfs: no credential lookup
            GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="false",  # else a 60 s gRPC probe per bucket
            GCE_METADATA_HOST="127.0.0.1:1",
            GCE_METADATA_IP="127.0.0.1:1",
            GCE_METADATA_ROOT="127.0.0.1:1",
            NO_GCE_CHECK="true",
            CLOUDSDK_CONFIG="",
        )
        return env

    def _request(self, path: str, data: bytes | None = None, method: str | None = None) -> bytes:
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()

    def upload(self, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._request(f"/upload/storage/v1/b/{BUCKET}/o?{query}", data, "POST")

    def upload_folder(self, folder: pathlib.Path, prefix: str) -> str:
        """Every file under `folder` to gs://bucket/PREFIX/...; returns that gs:// path."""
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                self.upload(f"{prefix}/{path.relative_to(folder).as_posix()}", path.read_bytes())
        return f"gs://{BUCKET}/{prefix}"

    def names(self, prefix: str) -> list[str]:
        """Object names under PREFIX/, relative to it, sorted."""
        found, token = [], None
        while True:
            query = {"prefix": prefix.rstrip("/") + "/"}
            if token:
                query["pageToken"] = token
            listing = json.loads(
                self._request(f"/storage/v1/b/{BUCKET}/o?{urllib.parse.urlencode(query)}")
            )
            found += [item["name"] for item in listing.get("items", [])]
            token = listing.get("nextPageToken")
            if not token:
                return sorted(name[len(prefix.rstrip("/")) + 1 :] for name in found)

    def read(self, name: str) -> bytes:
        quoted = urllib.parse.quote(name, safe="")
        return self._request(f"/download/storage/v1/b/{BUCKET}/o/{quoted}?alt=media")

    def copy(self, source: str, target: str) -> str:
        """Every object under SOURCE/ to TARGET/; returns gs://bucket/TARGET."""
        for name in self.names(source):
            self.upload(f"{target}/{name}", self.read(f"{source}/{name}"))
        return f"gs://{BUCKET}/{target}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def start(log: pathlib.Path, timeout: float = 60) -> Emulator:
    """Start the emulator (in memory, with one bucket) on a free port; wait until it answers."""
    port = free_port()
    command = [sys.executable, __file__, "start", "--host", "127.0.0.1", "--port", str(port),
               "--in-memory", "--default-bucket", BUCKET]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("STORAGE_EMULATOR")},
        )  # fmt: skip
    emulator = Emulator(f"http://127.0.0.1:{port}", process)
    deadline = time.time() + timeout
    while True:
        try:
            emulator._request(f"/storage/v1/b/{BUCKET}")
            return emulator
        except (urllib.error.URLError, ConnectionError):
            if process.poll() is not None or time.time() > deadline:
                emulator.stop()
                tail = log.read_text()[-2000:]
                raise RuntimeError(f"GCS emulator did not start: {tail}") from None
            time.sleep(0.2)


def _serve(argv: list[str]) -> None:
    """`python -m gcp_storage_emulator ARGV`, with downloads carrying their generation."""
    from gcp_storage_emulator import __main__ as emulator_main
    from gcp_storage_emulator import server
    from gcp_storage_emulator.exceptions import NotFound
    from gcp_storage_emulator.handlers import objects

    real = objects.download

    def download(request, response, storage, *args, **kwargs):
        try:
            obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
            response["x-goog-generation"] = str(obj["generation"])
            response["x-goog-metageneration"] = str(obj["metageneration"])
        except NotFound:
            pass
        return real(request, response, storage, *args, **kwargs)

    # Both routes to it: the download endpoint, and the JSON API's GET ...?alt=media (through
    # the module's own name).
    objects.download = download
    for _, handlers in server.HANDLERS:
        for method, handler in list(handlers.items()):
            if handler is real:
                handlers[method] = download
    emulator_main.main(argv)


if __name__ == "__main__":
    _serve(sys.argv[1:])
