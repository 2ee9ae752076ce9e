"""In-process tests of the reference generator (Flask test client only; no other services)."""
from __future__ import annotations

import io
import json
import threading
from typing import Any

import pytest
from PIL import Image

from generator import create_app
from generator.faults import parse_directives

ALL_STYLES = ("sketch", "sepia", "cartoon", "pixelate", "unfiltered")


def png_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    img = Image.new(mode, size)
    # A non-flat picture so edge and posterize filters have something to work on.
    for x in range(size[0]):
        for y in range(size[1]):
            img.putpixel((x, y), (x * 4 % 256, y * 5 % 256, (x * y) % 256) + ((200,) if mode == "RGBA" else ()))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@pytest.fixture
def client():
    return create_app(env={}).test_client()


def post(client, job_id: str = "job-1", image: bytes | None = None, **fields: Any):
    data = {"kind": "photo.render", "style": "sepia", "prompt": "", "safety_agreed": "false"}
    data.update(fields)
    if image is not None:
        data["image"] = (io.BytesIO(image), "photo.png")
    return client.post("/v1/renders", data=data, headers={"X-Job-Id": job_id},
                       content_type="multipart/form-data")


def decoded(resp) -> Image.Image:
    assert resp.status_code == 200, resp.get_data()
    assert resp.mimetype == "image/png"
    return Image.open(io.BytesIO(resp.get_data()))


@pytest.mark.parametrize("style", ALL_STYLES)
def test_photo_render_keeps_input_size(client, style):
    resp = post(client, image=png_bytes((70, 45)), style=style, safety_agreed="true")
    img = decoded(resp)
    assert img.format == "PNG" and img.size == (70, 45)


@pytest.mark.parametrize("style", ("sketch", "sepia", "cartoon", "pixelate"))
def test_styles_change_pixels(client, style):
    source = png_bytes((64, 64))
    out = decoded(post(client, image=source, style=style)).convert("RGB")
    assert out.tobytes() != Image.open(io.BytesIO(source)).convert("RGB").tobytes()


def test_unfiltered_is_identity_when_agreed(client):
    source = png_bytes((32, 20))
    out = decoded(post(client, image=source, style="unfiltered", safety_agreed="true"))
    assert out.convert("RGB").tobytes() == Image.open(io.BytesIO(source)).convert("RGB").tobytes()


def test_unfiltered_requires_safety_agreement(client):
    resp = post(client, image=png_bytes(), style="unfiltered", safety_agreed="false")
    assert resp.status_code == 422 and resp.get_json() == {"error": "SAFETY_AGREEMENT_REQUIRED"}


def test_transparent_and_tiny_images_render(client):
    assert decoded(post(client, image=png_bytes((5, 3), "RGBA"), style="cartoon")).size == (5, 3)
    assert decoded(post(client, image=png_bytes((1, 1)), style="pixelate")).size == (1, 1)


@pytest.mark.parametrize("style", ALL_STYLES)
def test_image_generate_is_512_square_and_seeded_by_prompt(client, style):
    first = post(client, kind="image.generate", style=style, prompt="a red fox", safety_agreed="true")
    again = post(client, kind="image.generate", style=style, prompt="a red fox", safety_agreed="true")
    assert decoded(first).size == (512, 512)
    assert first.get_data() == again.get_data()
    other = post(client, kind="image.generate", style=style, prompt="a blue whale", safety_agreed="true")
    assert other.get_data() != first.get_data()


@pytest.mark.parametrize("fields", [
    {"style": "watercolour"},
    {"kind": "video.render"},
])
def test_bad_fields_are_invalid_input(client, fields):
    resp = post(client, image=png_bytes(), **fields)
    assert resp.status_code == 400 and resp.get_json() == {"error": "INVALID_INPUT"}


def test_missing_image_for_photo_render(client):
    resp = post(client, image=None)
    assert resp.status_code == 400 and resp.get_json() == {"error": "INVALID_INPUT"}


@pytest.mark.parametrize("payload", [b"not an image at all", b"", png_bytes()[:60]])
def test_undecodable_upload_is_invalid_input(client, payload):
    resp = post(client, image=payload)
    assert resp.status_code == 400 and resp.get_json() == {"error": "INVALID_INPUT"}


def test_decompression_bomb_is_invalid_input(client):
    # A 1-bit 10000x10000 PNG is ~12 kB on the wire but 100 MP once decoded.
    out = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(out, format="PNG")
    resp = post(client, image=out.getvalue())
    assert resp.status_code == 400 and resp.get_json() == {"error": "INVALID_INPUT"}


def test_fail_directive_fails_first_n_calls_of_that_job_only(client):
    codes = [post(client, "job-f", png_bytes(), prompt="make it [fail:2] nice").status_code for _ in range(4)]
    assert codes == [503, 503, 200, 200]
    assert post(client, "job-f", png_bytes(), prompt="[fail:2]").status_code == 200
    busy = post(client, "job-g", png_bytes(), prompt="[fail:1]")
    assert busy.status_code == 503 and busy.get_json() == {"error": "GENERATOR_BUSY"}


@pytest.mark.parametrize("code", ["CONTENT_SAFETY_VIOLATION", "COPYRIGHT_VIOLATION", "SOMETHING_NEW"])
def test_block_directive(client, code):
    resp = post(client, image=png_bytes(), prompt="x [block:%s] y" % code)
    assert resp.status_code == 422 and resp.get_json() == {"error": code}


def test_invalid_directive(client):
    resp = post(client, image=png_bytes(), prompt="[invalid]")
    assert resp.status_code == 400 and resp.get_json() == {"error": "INVALID_INPUT"}


def test_slow_directive_delays_every_call(client, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("generator.app.time.sleep", slept.append)
    assert post(client, image=png_bytes(), prompt="[slow:250]").status_code == 200
    assert post(client, image=png_bytes(), prompt="[slow:250][block:COPYRIGHT_VIOLATION]").status_code == 422
    assert slept == [0.25, 0.25]


def test_directives_combine_in_order(client, monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("generator.app.time.sleep", slept.append)
    prompt = "[slow:500][fail:1][block:CONTENT_SAFETY_VIOLATION]"
    first = post(client, "job-c", png_bytes(), prompt=prompt)
    second = post(client, "job-c", png_bytes(), prompt=prompt)
    assert (first.status_code, first.get_json()) == (503, {"error": "GENERATOR_BUSY"})
    assert (second.status_code, second.get_json()) == (422, {"error": "CONTENT_SAFETY_VIOLATION"})
    assert slept == [0.5, 0.5]


def test_parse_directives():
    d = parse_directives("a [slow:10] b [fail:3] [block:COPYRIGHT_VIOLATION] [invalid]")
    assert (d.slow_ms, d.fail, d.block, d.invalid) == (10, 3, "COPYRIGHT_VIOLATION", True)
    plain = parse_directives("a [fail:x] [block:lower] [slow:]")
    assert (plain.slow_ms, plain.fail, plain.block, plain.invalid) == (0, 0, None, False)


def test_call_counters(client):
    assert client.get("/v1/calls/never-seen").get_json() == {
        "job_id": "never-seen", "calls": 0, "in_flight": 0, "max_in_flight": 0, "started_at": []}
    for _ in range(3):
        post(client, "job-n", png_bytes(), prompt="[fail:1]")
    post(client, "job-m", png_bytes(), style="nope")
    counters = client.get("/v1/calls/job-n").get_json()
    started_at = counters.pop("started_at")
    assert counters == {"job_id": "job-n", "calls": 3, "in_flight": 0, "max_in_flight": 1}
    assert len(started_at) == 3 and started_at == sorted(started_at)
    assert client.get("/v1/stats").get_json() == {"calls": 4, "in_flight": 0, "max_in_flight": 1}


def test_healthz_and_json_404(client):
    assert client.get("/healthz").get_json() == {"status": "ok"}
    assert client.get("/nowhere").status_code == 404 and "error" in client.get("/nowhere").get_json()


def concurrent_posts(app, job_ids: list[str], prompt: str) -> list[Any]:
    barrier = threading.Barrier(len(job_ids))
    results: list[Any] = [None] * len(job_ids)

    def worker(i: int) -> None:
        c = app.test_client()
        barrier.wait()
        results[i] = post(c, job_ids[i], png_bytes((16, 16)), prompt=prompt)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(job_ids))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


def test_concurrent_calls_for_one_job_are_visible():
    app = create_app(env={})
    results = concurrent_posts(app, ["dup", "dup", "dup"], "[slow:400]")
    assert [r.status_code for r in results] == [200, 200, 200]
    counts = app.test_client().get("/v1/calls/dup").get_json()
    assert counts["calls"] == 3 and counts["in_flight"] == 0 and counts["max_in_flight"] == 3


def test_max_concurrency_answers_429_with_retry_after():
    app = create_app(env={"GENERATOR_MAX_CONCURRENCY": "2"})
    results = concurrent_posts(app, ["c%d" % i for i in range(5)], "[slow:600]")
    codes = sorted(r.status_code for r in results)
    assert codes == [200, 200, 429, 429, 429]
    for r in results:
        if r.status_code == 429:
            assert r.get_json() == {"error": "RATE_LIMITED"} and r.headers["Retry-After"] == "1"
    assert app.test_client().get("/v1/stats").get_json()["calls"] == 5
    # Slots are released: a later call gets through.
    assert post(app.test_client(), "late", png_bytes()).status_code == 200


def test_failure_rate_one_fails_everything():
    client = create_app(env={"GENERATOR_FAILURE_RATE": "1.0"}).test_client()
    for i in range(5):
        resp = post(client, "r%d" % i, png_bytes())
        assert resp.status_code == 503 and resp.get_json() == {"error": "GENERATOR_BUSY"}


def test_latency_applies_to_every_render(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("generator.app.time.sleep", slept.append)
    client = create_app(env={"GENERATOR_LATENCY_MS": "120"}).test_client()
    post(client, image=png_bytes())
    post(client, image=png_bytes(), prompt="[slow:30]")
    assert slept == [pytest.approx(0.12), pytest.approx(0.15)]


@pytest.mark.parametrize("env", [
    {"GENERATOR_FAILURE_RATE": "1.5"},
    {"GENERATOR_FAILURE_RATE": "often"},
    {"GENERATOR_LATENCY_MS": "-1"},
    {"GENERATOR_MAX_CONCURRENCY": "two"},
])
def test_bad_fault_settings_fail_at_startup(env):
    with pytest.raises(ValueError):
        create_app(env=env)


def test_reads_os_environ_by_default(monkeypatch):
    monkeypatch.setenv("GENERATOR_FAILURE_RATE", "1")
    resp = post(create_app().test_client(), image=png_bytes())
    assert resp.status_code == 503


@pytest.mark.parametrize("env", [
    {"GENERATOR_429_RATE": "2"},
    {"GENERATOR_HANG_RATE": "-0.1"},
    {"GENERATOR_GARBAGE_RATE": "sometimes"},
    {"GENERATOR_HANG_MS": "-5"},
    {"GENERATOR_429_RETRY_AFTER": "-1"},
    {"GENERATOR_SEED": "abc"},
])
def test_bad_chaos_fault_settings_fail_at_startup(env):
    with pytest.raises(ValueError):
        create_app(env=env)


def test_429_rate_refuses_before_any_sleep_with_its_retry_after(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("generator.app.time.sleep", slept.append)
    app = create_app(env={"GENERATOR_429_RATE": "1", "GENERATOR_429_RETRY_AFTER": "7", "GENERATOR_LATENCY_MS": "500"})
    client = app.test_client()
    for _ in range(3):
        resp = post(client, "limited", png_bytes(), prompt="[slow:100]")
        assert resp.status_code == 429 and resp.get_json() == {"error": "RATE_LIMITED"}
        assert resp.headers["Retry-After"] == "7"
    assert slept == []  # a rate limit answers at once
    assert client.get("/v1/calls/limited").get_json()["calls"] == 3  # refused calls are still calls


def test_hang_rate_sleeps_far_longer_then_answers_as_usual(monkeypatch):
    slept: list[float] = []
    monkeypatch.setattr("generator.app.time.sleep", slept.append)
    client = create_app(env={"GENERATOR_HANG_RATE": "1", "GENERATOR_HANG_MS": "90000",
                             "GENERATOR_LATENCY_MS": "100"}).test_client()
    decoded(post(client, image=png_bytes()))
    blocked = post(client, image=png_bytes(), prompt="[block:COPYRIGHT_VIOLATION]")
    assert blocked.status_code == 422
    assert slept == [pytest.approx(90.1), pytest.approx(90.1)]


def test_garbage_rate_answers_200_with_a_body_that_is_not_an_image():
    client = create_app(env={"GENERATOR_GARBAGE_RATE": "1", "GENERATOR_SEED": "3"}).test_client()
    mimetypes = set()
    for i in range(12):
        resp = post(client, "g%d" % i, png_bytes())
        assert resp.status_code == 200
        mimetypes.add(resp.mimetype)
        with pytest.raises(Exception):
            Image.open(io.BytesIO(resp.get_data())).load()
    assert mimetypes == {"image/png", "text/html"}  # both kinds: an HTML page, and a PNG cut short
    # Only successes turn to garbage: refusals keep their code.
    assert post(client, image=png_bytes(), prompt="[invalid]").status_code == 400
    assert post(client, "fresh", png_bytes(), prompt="[fail:1]").status_code == 503


def test_fault_rates_draw_reproducibly_from_the_seed():
    env = {"GENERATOR_FAILURE_RATE": "0.5", "GENERATOR_429_RATE": "0.2", "GENERATOR_SEED": "42"}

    def codes() -> list[int]:
        client = create_app(env=env).test_client()
        return [post(client, "s%d" % i, png_bytes((8, 8))).status_code for i in range(30)]

    first = codes()
    assert first == codes()
    assert {200, 429, 503} <= set(first)


def test_call_log_has_a_start_and_an_end_line_per_call_from_many_threads(tmp_path):
    log_path = tmp_path / "calls.jsonl"
    app = create_app(env={"GENERATOR_CALL_LOG": str(log_path)})
    job_ids = ["j%d" % (i % 4) for i in range(16)]
    results = concurrent_posts(app, job_ids, "[slow:50]")
    post(app.test_client(), "refused", png_bytes(), prompt="[invalid]")
    lines = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(lines) == 2 * 17  # every line whole: none interleaved or lost
    ends = {line["call"]: line for line in lines if "end" in line}
    starts = {line["call"]: line for line in lines if "end" not in line}
    assert set(starts) == set(ends) and len(ends) == 17
    for call, end in ends.items():
        assert end["job_id"] == starts[call]["job_id"] and end["start"] == starts[call]["start"]
        assert end["start"] + 0.04 <= end["end"] or end["job_id"] == "refused"
    assert sorted(end["job_id"] for end in ends.values()) == sorted(job_ids + ["refused"])
    assert [end["status"] for end in ends.values() if end["job_id"] == "refused"] == [400]
    assert all(r.status_code == 200 for r in results)
    assert all(end["fault"] is None for end in ends.values())


def test_call_log_names_the_fault_a_call_met(tmp_path):
    log_path = tmp_path / "calls.jsonl"
    client = create_app(env={"GENERATOR_CALL_LOG": str(log_path), "GENERATOR_429_RATE": "1"}).test_client()
    post(client, "x", png_bytes())
    end = [json.loads(line) for line in log_path.read_text().splitlines()][-1]
    assert (end["job_id"], end["status"], end["fault"]) == ("x", 429, "rate_limit")
