"""Media through the proxy: a 20 MB upload and download, byte-identical, and streamed (the proxy's
resident memory does not grow by anything like the body size)."""

import hashlib
import io
import os

from e2e_helpers import assert_ok, register

SIZE = 20 * 1024 * 1024
CHUNK = 256 * 1024
# A proxy that buffered a 20 MB body would peak at least ~20 MB higher; a streaming one moves
# it in small frames. Allow allocator noise well below the body size.
MAX_GROWTH_KB = 8 * 1024


def _payload() -> bytes:
    # incompressible and deterministic enough to compare
    return hashlib.sha256(b"seed").digest() * 16 + os.urandom(SIZE - 512)


def test_upload_and_download_20mb_streamed(proxy, synapse):
    api = proxy.api
    s = register(api, refresh=True)
    data = _payload()
    digest = hashlib.sha256(data).hexdigest()

    # warm-up: the first requests through a new connection pool allocate buffers of their own
    small = assert_ok(api.post("/_matrix/media/v3/upload", s.access_token, data=b"x" * 1024,
                               headers={"Content-Type": "application/octet-stream"}))
    rss0, hwm0 = proxy.status_kb("VmRSS"), proxy.status_kb("VmHWM")

    # Synapse requires a Content-Length on uploads; a file object makes requests send one and
    # stream the body from it
    r = api.post("/_matrix/media/v3/upload", s.access_token, data=io.BytesIO(data),
                 params={"filename": "big.bin"}, headers={"Content-Type": "application/octet-stream"})
    mxc = assert_ok(r, "20 MB upload through the proxy")["content_uri"]
    assert mxc.startswith("mxc://")
    server, media_id = mxc[len("mxc://"):].split("/", 1)

    got = hashlib.sha256()
    n = 0
    with api.get(f"/_matrix/client/v1/media/download/{server}/{media_id}", s.access_token, stream=True) as d:
        assert d.status_code == 200, f"download: {d.status_code} {d.text[:500]}"
        for part in d.iter_content(CHUNK):
            got.update(part)
            n += len(part)
    assert n == SIZE, f"downloaded {n} bytes, uploaded {SIZE}"
    assert got.hexdigest() == digest, "downloaded bytes differ from the upload"

    rss1, hwm1 = proxy.status_kb("VmRSS"), proxy.status_kb("VmHWM")
    growth = max(rss1 - rss0, hwm1 - hwm0)
    print(f"proxy memory: VmRSS {rss0} -> {rss1} kB, VmHWM {hwm0} -> {hwm1} kB")
    assert growth < MAX_GROWTH_KB, (
        f"proxy memory grew by {growth} kB moving a {SIZE // 1024} kB body "
        f"(VmRSS {rss0}->{rss1} kB, VmHWM {hwm0}->{hwm1} kB): bodies are buffered, not streamed")

    # the file is also byte-identical when read straight from Synapse
    direct = synapse.api.get(f"/_matrix/client/v1/media/download/{server}/{media_id}", synapse.admin_token)
    assert direct.status_code == 200 and hashlib.sha256(direct.content).hexdigest() == digest
    assert small["content_uri"] != mxc
