"""The HTTP service over a fake retriever: happy paths, limits, hostile inputs, auth, concurrency."""

from __future__ import annotations

import io
import struct
import threading
import time
import zlib
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("multipart")
from fastapi.testclient import TestClient
from PIL import Image

from xmr.errors import UnsupportedQuery, XmrError
from xmr.serve import ServeSettings, create_app, serve_in_thread

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40),
          "purple": (140, 40, 160), "orange": (250, 140, 20)}


class FakeRetriever:
    """The Retriever interface over a few solid-colour images: texts match colour names, images match
    by mean colour. `gate` (an Event) makes text searches block, to fill the query queue."""

    model_id = "fake-0001"

    def __init__(self, root: Path, paths: list[str], *, composed: bool = True) -> None:
        self.images_root = root
        self.paths = paths
        self.supports_composed = composed
        self.gate: threading.Event | None = None
        self.fail_with: Exception | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def _hits(self, scores: list[float], k: int) -> list:
        from types import SimpleNamespace

        order = sorted(range(len(scores)), key=lambda i: -scores[i])[:k]
        return [SimpleNamespace(id=i, path=self.paths[i], score=scores[i]) for i in order]

    def _text_scores(self, text: str) -> list[float]:
        return [1.0 if Path(p).stem in text.lower() else 0.5 / (i + 2) for i, p in enumerate(self.paths)]

    def search_text(self, text: str, k: int = 10, rerank_depth: int | None = None,
                    refine: bool | None = None) -> list:
        self.last_depth, self.last_refine = rerank_depth, refine
        if self.gate is not None:
            self.gate.wait(10)
        if self.fail_with is not None:
            raise self.fail_with
        return self._hits(self._text_scores(text), k)

    def _colour_scores(self, mean: tuple[int, ...]) -> list[float]:
        return [1.0 - sum(abs(a - b) for a, b in zip(mean, COLORS.get(Path(p).stem, (128, 128, 128)))) / 765
                for p in self.paths]

    def search_image(self, image: Image.Image, k: int = 10, rerank_depth: int | None = None,
                    refine: bool | None = None) -> list:
        return self._hits(self._colour_scores(image.convert("RGB").resize((1, 1)).getpixel((0, 0))), k)

    def search_similar(self, id: int, k: int = 10, rerank_depth: int | None = None,
                    refine: bool | None = None) -> list:
        """From the indexed item's stored colour (its 'vector'): no image is read."""
        self.similar_calls = getattr(self, "similar_calls", 0) + 1
        scores = self._colour_scores(COLORS.get(Path(self.paths[id]).stem, (128, 128, 128)))
        return [h for h in self._hits(scores, k + 1) if h.id != id][:k]

    def search_composed(self, image: Image.Image, text: str, k: int = 10, rerank_depth: int | None = None,
                    refine: bool | None = None) -> list:
        if not self.supports_composed:
            raise UnsupportedQuery("this fake model cannot compose an image with a modifying text")
        image_scores = [h.score for h in sorted(self.search_image(image, len(self)), key=lambda h: h.id)]
        return self._hits([a + b for a, b in zip(image_scores, self._text_scores(text))], k)

    def image_path(self, id: int) -> Path:
        if not 0 <= id < len(self.paths):
            raise KeyError(id)
        return self.images_root / self.paths[id]

    def info(self) -> dict:
        return {"model_id": self.model_id, "count": len(self), "backend": "fake", "kind": "flat", "dim": 3,
                "root": self.images_root}


def make_gallery(root: Path, size: tuple[int, int] = (96, 64)) -> list[str]:
    """Solid-colour images (PNG, and one JPEG in a sub-folder); returns their relative paths."""
    paths = []
    for name, rgb in COLORS.items():
        rel = f"sub/{name}.jpg" if name == "orange" else f"{name}.png"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, rgb).save(root / rel)
        paths.append(rel)
    return paths


def png_bytes(color: tuple[int, int, int] = (220, 30, 30), size: tuple[int, int] = (40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, color).save(out, format="PNG")
    return out.getvalue()


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid PNG header declaring width x height with a tiny (wrong-sized) IDAT: the bomb is in the
    header, so a service that decodes before checking the size would try to allocate gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


@pytest.fixture()
def gallery(tmp_path: Path) -> tuple[Path, list[str]]:
    root = tmp_path / "images"
    return root, make_gallery(root)


@pytest.fixture()
def fake(gallery) -> FakeRetriever:
    return FakeRetriever(*gallery)


@pytest.fixture()
def client(fake) -> TestClient:
    return TestClient(create_app(fake, ServeSettings(max_upload_bytes=200_000, max_image_pixels=4_000_000)))


def error_of(response, status: int, code: str | None = None) -> str:
    """Assert the uniform error shape and return its message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
    if code is not None:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body["error"]["message"]


def text_query(client, text: str = "a red shirt", k=3, **kw):
    return client.post("/api/search/text", json={"text": text, "k": k}, **kw)


# ------------------------------------------------------------------------------------------------
# Happy paths
# ------------------------------------------------------------------------------------------------
def test_health_and_info(client, fake):
    body = client.get("/api/health").json()
    assert body["status"] == "ok" and body["count"] == len(fake) and body["model_id"] == "fake-0001"
    assert body["supports_composed"] is True and body["auth_required"] is False
    assert body["limits"]["max_k"] == 100
    info = client.get("/api/info").json()
    assert info["backend"] == "fake" and isinstance(info["root"], str)


def test_text_search_results(client):
    r = text_query(client, "a man in a BLUE coat", k=3)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0]["path"] == "blue.png" and len(body["results"]) == 3
    top = body["results"][0]
    assert top["thumbnail_url"] == f"/api/thumbnails/{top['id']}" and top["image_url"] == f"/api/images/{top['id']}"
    assert body["query"] == {"kind": "text", "k": 3, "text": "a man in a BLUE coat", "id": None, "width": None,
                             "height": None}
    assert body["took_ms"] >= 0
    assert len(client.post("/api/search/text", json={"text": "green"}).json()["results"]) == 6  # default_k 10


def test_image_search_upload(client):
    r = client.post("/api/search/image", files={"file": ("q.png", png_bytes(COLORS["yellow"]), "image/png")},
                    data={"k": "2"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["results"][0]["path"] == "yellow.png" and len(body["results"]) == 2
    assert (body["query"]["width"], body["query"]["height"]) == (40, 30)
    # Files without a declared type (browsers send application/octet-stream) are accepted too.
    r = client.post("/api/search/image", files={"file": ("q", png_bytes(), "application/octet-stream")})
    assert r.status_code == 200 and r.json()["results"][0]["path"] == "red.png"


def test_rgba_and_exif_images_are_accepted(client):
    out = io.BytesIO()
    Image.new("RGBA", (20, 20), (30, 60, 220, 255)).save(out, format="PNG")
    r = client.post("/api/search/image", files={"file": ("a.png", out.getvalue(), "image/png")})
    assert r.status_code == 200 and r.json()["results"][0]["path"] == "blue.png"


def test_composed_search(client, fake):
    files = {"file": ("q.png", png_bytes(COLORS["purple"]), "image/png")}
    r = client.post("/api/search/composed", files=files, data={"text": "but green", "k": "4"})
    assert r.status_code == 200, r.text
    assert r.json()["query"]["kind"] == "composed" and len(r.json()["results"]) == 4
    fake.supports_composed = False
    r = client.post("/api/search/composed", files=files, data={"text": "but green"})
    assert "cannot compose" in error_of(r, 400, "unsupported_query")
    assert client.get("/api/health").json()["supports_composed"] is False


def test_real_unsupported_query_class_maps_to_400(client, fake):
    from xmr.search.retriever import UnsupportedQuery as RealUnsupported

    fake.fail_with = RealUnsupported("the model cannot compose")
    assert error_of(text_query(client), 400, "unsupported_query") == "the model cannot compose"


def test_similar_leaves_the_image_out(client, fake):
    r = client.post("/api/search/similar", json={"id": 0, "k": 3})
    assert r.status_code == 200, r.text
    ids = [h["id"] for h in r.json()["results"]]
    assert 0 not in ids and len(ids) == 3
    assert fake.similar_calls == 1  # answered from the stored vector, not by decoding the image
    error_of(client.post("/api/search/similar", json={"id": 99}), 404, "not_found")


def test_rerank_depth_is_validated_and_passed_on(client, fake):
    r = client.post("/api/search/text", json={"text": "red", "k": 3, "rerank_depth": 50})
    assert r.status_code == 200, r.text and fake.last_depth == 50
    limit = client.get("/api/health").json()["limits"]["max_rerank_depth"]
    for bad in (-1, limit + 1):
        msg = error_of(client.post("/api/search/text", json={"text": "red", "rerank_depth": bad}), 422,
                       "invalid_rerank_depth")
        assert f"between 0 and {limit}" in msg
    error_of(client.post("/api/search/similar", json={"id": 0, "rerank_depth": limit + 1}), 422,
             "invalid_rerank_depth")
    error_of(client.post("/api/search/image", files={"file": ("a.png", png_bytes(), "image/png")},
                         data={"rerank_depth": str(limit + 1)}), 422, "invalid_rerank_depth")


def test_original_and_thumbnail(client, gallery):
    root, paths = gallery
    r = client.get("/api/images/5")
    assert r.status_code == 200 and r.content == (root / paths[5]).read_bytes()
    assert r.headers["content-type"] == "image/jpeg" and r.headers["x-content-type-options"] == "nosniff"
    big = root / "big.png"
    Image.new("RGB", (1200, 600), (10, 200, 10)).save(big)
    paths.append("big.png")
    t = client.get(f"/api/thumbnails/{len(paths) - 1}")
    assert t.status_code == 200 and t.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(t.content)).size == (256, 128)
    cache = client.app.state.service.thumbnail_cache
    before = cache.hits
    assert client.get(f"/api/thumbnails/{len(paths) - 1}").content == t.content and cache.hits == before + 1


def test_metrics_count_queries_and_errors(client):
    for text in ("red", "green", "blue"):
        assert text_query(client, text).status_code == 200
    error_of(text_query(client, ""), 422, "empty_text")
    client.get("/api/thumbnails/1")
    m = client.get("/api/metrics").json()
    assert m["queries"] == 4 and m["query_errors"] == 1 and m["errors"] == 1
    route = m["by_route"]["/api/search/text"]
    assert route["count"] == 4 and route["errors"] == 1
    assert all(isinstance(route["latency_ms"][p], float) for p in ("p50", "p90", "p99"))
    assert m["latency_ms"]["p50"] <= m["latency_ms"]["p99"]
    assert m["by_route"]["/api/thumbnails/{id}"]["count"] == 1
    assert m["status"]["200"] >= 4 and m["status"]["422"] == 1 and m["capacity"] == 18


def test_page_docs_and_static(client):
    page = client.get("/")
    assert page.status_code == 200 and "<html" in page.text.lower()
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for asset in ("app.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for route in ("/api/search/text", "/api/search/image", "/api/search/composed", "/api/images/{id}"):
        assert route in spec["paths"]
    assert "SearchResponse" in spec["components"]["schemas"]
    error_of(client.get("/no/such/route"), 404, "not_found")
    error_of(client.get("/api/search/text"), 405, "method_not_allowed")


# ------------------------------------------------------------------------------------------------
# Bad inputs: each is refused with a 4xx JSON error and the service keeps serving
# ------------------------------------------------------------------------------------------------
def truncated_jpeg() -> bytes:
    out = io.BytesIO()
    Image.effect_noise((128, 128), 60).convert("RGB").save(out, format="JPEG", quality=90)
    data = out.getvalue()
    return data[: len(data) // 2]


BAD_UPLOADS = [
    ("not an image", ("notes.png", b"hello, this is text" * 10, "image/png"), 400, "invalid_image"),
    ("empty file", ("empty.png", b"", "image/png"), 400, "invalid_image"),
    ("truncated jpeg", ("cut.jpg", truncated_jpeg(), "image/jpeg"), 400, "invalid_image"),
    ("20000x20000 png", ("bomb.png", huge_png(), "image/png"), 413, "too_large"),
    ("over the byte limit", ("big.png", b"\x89PNG" + b"\0" * 300_000, "image/png"), 413, "too_large"),
    ("file just over the limit", ("big.png", b"\x89PNG" + b"\0" * 210_000, "image/png"), 413, "too_large"),
    ("wrong content type", ("q.txt", png_bytes(), "text/plain"), 415, "unsupported_media_type"),
]


@pytest.mark.parametrize("route", ["/api/search/image", "/api/search/composed"])
@pytest.mark.parametrize("name,file,status,code", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS])
def test_bad_uploads(client, route, name, file, status, code):
    error_of(client.post(route, files={"file": file}, data={"text": "in green"}), status, code)
    assert client.get("/api/health").status_code == 200


def test_pixel_limit_is_checked_before_decoding(fake):
    client = TestClient(create_app(fake, ServeSettings(max_image_pixels=1000)))
    message = error_of(client.post("/api/search/image", files={"file": ("q.png", png_bytes(size=(50, 50)))}),
                       413, "too_large")
    assert "50x50" in message


BAD_TEXT_QUERIES = [
    ({"text": ""}, "empty_text"), ({"text": "   "}, "empty_text"), ({"text": "x" * 10_000}, "text_too_long"),
    ({"text": "red", "k": 0}, "invalid_k"), ({"text": "red", "k": -5}, "invalid_k"),
    ({"text": "red", "k": 10**12}, "invalid_k"), ({"text": "red", "k": 101}, "invalid_k"),
    ({"text": "red", "k": "many"}, "validation_error"), ({"k": 3}, "validation_error"),
    ({"text": ["red"]}, "validation_error"), ({"text": 12}, "validation_error"),
]


@pytest.mark.parametrize("body,code", BAD_TEXT_QUERIES, ids=[c + str(i) for i, (_, c) in enumerate(BAD_TEXT_QUERIES)])
def test_bad_text_queries(client, body, code):
    message = error_of(client.post("/api/search/text", json=body), 422, code)
    assert len(message) < 300  # the 10,000 characters are not echoed back


def test_bad_bodies(client):
    error_of(client.post("/api/search/text", content=b'{"text": "red"', headers={"content-type": "application/json"}),
             422, "validation_error")
    error_of(client.post("/api/search/text", content=b"red", headers={"content-type": "text/plain"}), 422)
    error_of(client.post("/api/search/image", data={"k": "3"}), 422, "validation_error")  # no file
    files = {"file": ("q.png", png_bytes(), "image/png")}
    error_of(client.post("/api/search/image", files=files, data={"k": "0"}), 422, "invalid_k")
    error_of(client.post("/api/search/image", files=files, data={"k": "ten"}), 422, "validation_error")
    error_of(client.post("/api/search/composed", files=files), 422, "empty_text")
    error_of(client.post("/api/search/composed", files=files, data={"text": "y" * 5000}), 422, "text_too_long")


def test_streamed_body_over_limit_is_cut_off(client):
    def chunks():
        yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(40):
            yield b"\0" * 10_000  # 400 KB without a Content-Length: counted while it streams in

    r = client.post("/api/search/image", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    error_of(r, 413, "too_large")


def test_declared_content_length_over_limit_is_refused_unread(client):
    r = client.post("/api/search/image", content=b"x" * 10, headers={"content-length": "999999999",
                                                                    "content-type": "multipart/form-data; boundary=b"})
    error_of(r, 413, "too_large")


@pytest.mark.parametrize("url", [
    "/api/images/99", "/api/thumbnails/6", "/api/images/-1", "/api/images/1.5", "/api/images/abc",
    "/api/images/99999999999999999999999", "/api/images/..%2F..%2Fetc%2Fpasswd", "/api/images/%2e%2e%2f%2e%2e%2fetc",
    "/api/images/%2Fetc%2Fpasswd", "/api/thumbnails/..%2f..%2fsecret.txt", "/api/images/0%2F..%2F..%2Fsecret.txt",
    "/api/images/../../secret.txt", "/api/images//etc/passwd", "/static/..%2F..%2Fsecret.txt",
    "/static/%2e%2e/%2e%2e/secret.txt",
])
def test_unknown_ids_and_path_traversal(client, tmp_path, url):
    (tmp_path / "secret.txt").write_text("TOP SECRET")
    r = client.get(url)
    assert r.status_code in (404, 422), (url, r.status_code)
    assert b"SECRET" not in r.content and b"root:" not in r.content
    error_of(r, r.status_code)


def test_symlink_outside_root_is_refused(client, fake, tmp_path):
    secret = tmp_path / "outside.png"
    Image.new("RGB", (8, 8)).save(secret)
    (fake.images_root / "link.png").symlink_to(secret)
    fake.paths += ["link.png", str(secret)]  # a symlink out of the root, and an absolute path outside it
    for id in (len(fake.paths) - 2, len(fake.paths) - 1):
        for route in ("images", "thumbnails"):
            error_of(client.get(f"/api/{route}/{id}"), 404, "not_found")
        error_of(client.post("/api/search/similar", json={"id": id}), 404, "not_found")


def test_api_key(fake):
    client = TestClient(create_app(fake, ServeSettings(api_key="s3cret")))
    assert client.get("/api/health").json()["auth_required"] is True  # health stays open
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
    for headers, code in (({}, "missing_api_key"), ({"X-API-Key": "wrong"}, "wrong_api_key"),
                          ({"X-API-Key": "s3cret "}, "wrong_api_key"), ({"X-API-Key": ""}, "missing_api_key")):
        error_of(text_query(client, headers=headers), 401, code)
        error_of(client.get("/api/images/0", headers=headers), 401, code)
        error_of(client.get("/api/metrics", headers=headers), 401, code)
    error_of(client.get("/api/images/0", params={"api_key": "s3cret"}), 401)  # header only, never in URLs
    ok = {"X-API-Key": "s3cret"}
    assert text_query(client, headers=ok).status_code == 200
    assert client.get("/api/thumbnails/0", headers=ok).status_code == 200
    assert client.get("/api/metrics", headers=ok).json()["errors"] == 13


def test_unexpected_exception_is_a_json_500_and_service_survives(client, fake, caplog):
    fake.fail_with = RuntimeError("boom at /secret/internal/path")
    r = text_query(client)
    assert "boom" not in error_of(r, 500, "internal_error")
    assert any("unhandled error" in rec.message for rec in caplog.records)
    fake.fail_with = XmrError("the index is being rebuilt")
    assert "rebuilt" in error_of(text_query(client), 400, "query_error")
    fake.fail_with = None
    assert text_query(client).status_code == 200
    assert client.get("/api/metrics").json()["status"]["500"] == 1


def test_still_serving_after_abuse(client):
    for _, file, _, _ in BAD_UPLOADS:
        client.post("/api/search/image", files={"file": file})
    for body, _ in BAD_TEXT_QUERIES:
        client.post("/api/search/text", json=body)
    client.get("/api/images/..%2F..%2Fetc%2Fpasswd")
    assert client.get("/api/health").status_code == 200
    r = text_query(client, "orange", k=1)
    assert r.status_code == 200 and r.json()["results"][0]["path"] == "sub/orange.jpg"
    assert client.app.state.service.queries.pending == 0


# ------------------------------------------------------------------------------------------------
# Concurrency: max_concurrency running, max_queue waiting, then 503 at once
# ------------------------------------------------------------------------------------------------
def test_queue_full_answers_503_quickly(fake):
    import httpx

    fake.gate = threading.Event()
    app = create_app(fake, ServeSettings(max_concurrency=1, max_queue=1))
    limiter = app.state.service.queries
    with serve_in_thread(app) as url:
        results: list[int] = []
        workers = [threading.Thread(target=lambda: results.append(
            httpx.post(f"{url}/api/search/text", json={"text": "red"}, timeout=20).status_code)) for _ in range(2)]
        for w in workers:
            w.start()
        deadline = time.monotonic() + 10
        while limiter.pending < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert limiter.pending == 2
        start = time.monotonic()
        r = httpx.post(f"{url}/api/search/text", json={"text": "red"}, timeout=20)
        assert time.monotonic() - start < 2
        error_of(r, 503, "busy")
        assert r.headers["retry-after"] == "1"
        assert httpx.get(f"{url}/api/health", timeout=5).status_code == 200  # not stuck behind the queue
        fake.gate.set()
        for w in workers:
            w.join(20)
        assert results == [200, 200]
        metrics = httpx.get(f"{url}/api/metrics", timeout=5).json()
        assert metrics["rejected"] == 1 and metrics["in_flight"] == 0


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------
def test_settings_from_env_and_validation():
    from xmr.errors import ConfigError

    s = ServeSettings.from_env({"XMR_API_KEY": "k1", "XMR_SERVE_PORT": "9001", "XMR_SERVE_MAX_K": "50",
                                "XMR_SERVE_CORS_ORIGINS": "http://a, http://b", "XMR_SERVE_ACCESS_LOG": "no"},
                               max_concurrency=3, host=None)
    assert (s.api_key, s.port, s.max_k, s.max_concurrency, s.host) == ("k1", 9001, 50, 3, "127.0.0.1")
    assert s.cors_origins == ("http://a", "http://b") and s.access_log is False
    assert ServeSettings.from_env({"XMR_API_KEY": "a", "XMR_SERVE_API_KEY": "b"}).api_key == "b"
    for bad in ({"max_k": 0}, {"default_k": 500}, {"max_concurrency": -1}, {"api_key": " "}, {"port": 70000}):
        with pytest.raises(ConfigError):
            ServeSettings(**bad)
    with pytest.raises(ConfigError, match="not an integer"):
        ServeSettings.from_env({"XMR_SERVE_PORT": "eighty"})
