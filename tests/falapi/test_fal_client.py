"""The official Python ``fal-client``, unchanged, against ``falgate serve`` over TLS.

Only the environment changes (README, "fal's own API"): ``FAL_KEY`` is a falgate key,
``FAL_RUN_HOST``/``FAL_QUEUE_RUN_HOST`` point at ``/fal/run`` and ``/fal/queue`` and
``SSL_CERT_FILE`` at the development CA that ``falgate serve`` printed. After each scenario
the key's ledger is exactly what the sandbox produced.
"""

from __future__ import annotations

import json
import time

import httpx

from tests.conftest import Sandbox
from tests.falapi.conftest import TlsGateway, assert_billed_as_produced

BIG_SEED = 2**64 - 3


def test_run_submit_status_result_subscribe(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    key_id, key = tls_gateway.create_key()
    out = tls_gateway.python(
        key,
        f"""
        import json
        import fal_client

        out = {{}}
        out["run"] = fal_client.run(
            "fal-ai/flux/dev",
            arguments={{"prompt": "a fox", "image_size": "square", "seed": {BIG_SEED},
                        "sync_mode": False, "enable_safety_checker": True}},
        )
        handle = fal_client.submit(
            "fal-ai/flux/schnell", arguments={{"prompt": "x", "output_format": "png"}}
        )
        out["request_id"] = handle.request_id
        out["urls"] = [handle.status_url, handle.response_url, handle.cancel_url]
        status = fal_client.status("fal-ai/flux/schnell", handle.request_id, with_logs=True)
        out["status"] = [type(status).__name__, getattr(status, "logs", None)]
        out["get"] = handle.get()
        final = handle.status(with_logs=False)
        out["final"] = type(final).__name__
        out["result"] = fal_client.result("fal-ai/flux/schnell", handle.request_id)
        updates = []
        out["subscribe"] = fal_client.subscribe(
            "fal-ai/fast-sdxl",
            arguments={{"prompt": "x", "format": "png", "negative_prompt": "blur"}},
            with_logs=True,
            on_queue_update=lambda update: updates.append(type(update).__name__),
        )
        out["updates"] = updates
        print(json.dumps(out))
        """,
    )
    assert out["run"]["seed"] == BIG_SEED
    assert out["run"]["images"][0]["width"] == 512

    rid = out["request_id"]
    assert rid.startswith("req_")
    base = f"{tls_gateway.url}/fal/queue/fal-ai/flux/requests/{rid}"
    assert out["urls"] == [base + "/status", base, base + "/cancel"]
    assert out["status"][0] in ("InProgress", "Completed")
    assert out["final"] == "Completed"
    assert out["get"] == out["result"]
    image = out["get"]["images"][0]
    assert (image["width"], image["height"], image["content_type"]) == (1024, 768, "image/png")
    # fast-sdxl's own default size on fal's API is square_hd
    assert out["subscribe"]["images"][0]["width"] == 1024
    assert out["updates"] and out["updates"][-1] == "Completed"

    settles = assert_billed_as_produced(tls_gateway, key_id, key)
    assert len(settles) == 3
    sent = {r["endpoint"]: r for r in fal_sandbox.requests()}
    assert set(sent) == {"fal-ai/flux/dev", "fal-ai/flux/schnell", "fal-ai/fast-sdxl"}


def test_fal_fields_are_passed_on(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    """``sync_mode`` reaches fal (its images come back inline), ``expand_prompt`` is accepted."""
    key_id, key = tls_gateway.create_key()
    with tls_gateway.client(key) as client:
        response = client.post(
            "/fal/run/fal-ai/fast-sdxl",
            json={"prompt": "x", "image_size": "square", "sync_mode": True, "expand_prompt": True},
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-fal-request-id"] == response.headers["X-Request-Id"]
    assert response.json()["images"][0]["url"].startswith("data:image/jpeg")
    (settle,) = assert_billed_as_produced(tls_gateway, key_id, key)
    assert settle["amount_micro"] == 1_836  # 512x512 at 0.007 USD/MP, rounded up


def test_errors_reach_the_clients_own_error_class(
    tls_gateway: TlsGateway, fal_sandbox: Sandbox
) -> None:
    key_id, key = tls_gateway.create_key()
    out = tls_gateway.python(
        key,
        """
        import json
        import fal_client

        out = {}
        for name, app, args in [
            ("invalid", "fal-ai/flux/dev", {"num_images": 9}),
            ("steps", "fal-ai/flux/dev", {"prompt": "x", "num_inference_steps": 80}),
            ("unknown_field", "fal-ai/flux-pro/v1.1", {"prompt": "x", "guidance_scale": 3}),
            ("unknown_model", "fal-ai/not-in-the-catalog", {"prompt": "x"}),
        ]:
            try:
                fal_client.run(app, arguments=args)
                out[name] = None
            except fal_client.FalClientHTTPError as exc:
                out[name] = [exc.status_code, exc.message, exc.error_type]
        try:
            fal_client.submit("fal-ai/flux/dev", arguments={"prompt": "x"},
                              webhook_url="https://example.com/hook")
            out["webhook"] = None
        except fal_client.FalClientHTTPError as exc:
            out["webhook"] = [exc.status_code, exc.message, exc.error_type]
        print(json.dumps(out))
        """,
    )
    status, detail, error_type = out["invalid"]
    assert (status, error_type) == (422, "invalid_request")
    assert {tuple(d["loc"]) for d in detail} == {("body", "prompt"), ("body", "num_images")}
    status, detail, _ = out["steps"]
    assert status == 422 and detail[0]["loc"] == ["body", "num_inference_steps"]
    assert "at most 50" in detail[0]["msg"]
    status, detail, _ = out["unknown_field"]
    assert status == 422 and detail[0]["loc"] == ["body", "guidance_scale"]
    assert out["unknown_model"][0] == 404 and out["unknown_model"][2] == "model_not_found"
    assert "not-in-the-catalog" in out["unknown_model"][1]
    assert out["webhook"][0] == 400 and "fal_webhook" in out["webhook"][1]

    assert fal_sandbox.requests() == []  # nothing refused reached fal
    assert tls_gateway.ledger(key_id) == []


def test_budget_and_auth_errors_are_fal_shaped(
    tls_gateway: TlsGateway, fal_sandbox: Sandbox
) -> None:
    _, poor = tls_gateway.create_key(budget_usd="0.001", budget_period="total")
    with tls_gateway.client() as client:
        refused = client.post(
            "/fal/run/fal-ai/flux/dev",
            json={"prompt": "x"},
            headers={"Authorization": f"Key {poor}"},
        )
        anonymous = client.post("/fal/queue/fal-ai/flux/dev", json={"prompt": "x"})
    assert refused.status_code == 402
    body = refused.json()
    assert body["error_type"] == "budget_exceeded" and "0.011797" in body["detail"]
    assert refused.headers["X-Fal-Error-Type"] == "budget_exceeded"
    assert anonymous.status_code == 401 and anonymous.json()["error_type"] == "unauthorized"
    assert fal_sandbox.requests() == []


def test_rate_limits_apply_as_on_v1(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    key_id, key = tls_gateway.create_key(rpm=1)
    with tls_gateway.client(key) as client:
        first = client.post("/fal/queue/fal-ai/flux/dev", json={"prompt": "x"})
        second = client.post("/fal/run/fal-ai/flux/dev", json={"prompt": "x"})
    assert first.status_code == 200 and first.headers["RateLimit-Limit"] == "1"
    assert second.status_code == 429 and second.json()["error_type"] == "rate_limited"
    assert int(second.headers["Retry-After"]) > 0
    assert len(assert_billed_as_produced(tls_gateway, key_id, key)) == 1


def test_another_keys_request_id_is_404(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    owner_id, owner = tls_gateway.create_key()
    _, stranger = tls_gateway.create_key()
    rid = tls_gateway.python(
        owner,
        """
        import json
        import fal_client

        handle = fal_client.submit("fal-ai/flux/dev", arguments={"prompt": "mine"})
        print(json.dumps(handle.request_id))
        """,
    )
    out = tls_gateway.python(
        stranger,
        f"""
        import json
        import fal_client

        out = {{}}
        for name, call in [
            ("status", lambda: fal_client.status("fal-ai/flux/dev", {rid!r})),
            ("result", lambda: fal_client.result("fal-ai/flux/dev", {rid!r})),
            ("cancel", lambda: fal_client.cancel("fal-ai/flux/dev", {rid!r})),
        ]:
            try:
                call()
                out[name] = None
            except fal_client.FalClientHTTPError as exc:
                out[name] = exc.status_code
        print(json.dumps(out))
        """,
    )
    assert out == {"status": 404, "result": 404, "cancel": 404}
    # The owner's job was neither cancelled nor disturbed: it completes and is billed.
    (settle,) = assert_billed_as_produced(tls_gateway, owner_id, owner)
    assert settle["request_id"] == rid


def test_a_submitted_job_nobody_fetches_is_settled(
    tls_gateway: TlsGateway, fal_sandbox: Sandbox
) -> None:
    key_id, key = tls_gateway.create_key()
    rid = tls_gateway.python(
        key,
        """
        import json
        import fal_client

        handle = fal_client.submit(
            "fal-ai/flux/dev", arguments={"prompt": "fire and forget", "num_images": 2}
        )
        print(json.dumps(handle.request_id))
        """,
    )
    (settle,) = assert_billed_as_produced(tls_gateway, key_id, key)
    assert settle["request_id"] == rid
    assert settle["amount_micro"] == 23_593  # 2 x 1024x768 at 0.015 USD/MP, rounded up once


def test_cancel_releases_what_fal_did_not_make(
    tls_gateway: TlsGateway, fal_sandbox: Sandbox
) -> None:
    fal_sandbox.configure(latency_ms=5000)
    key_id, key = tls_gateway.create_key()
    out = tls_gateway.python(
        key,
        """
        import json, time
        import fal_client

        handle = fal_client.submit("fal-ai/flux-pro/v1.1", arguments={"prompt": "x"})
        handle.cancel()
        for _ in range(200):
            status = handle.status()
            if isinstance(status, fal_client.Completed):
                break
            time.sleep(0.05)
        try:
            handle.get()
            result = None
        except fal_client.FalClientHTTPError as exc:
            result = exc.status_code
        print(json.dumps({"id": handle.request_id, "status": type(status).__name__,
                          "error": status.error, "result": result}))
        """,
    )
    assert out["status"] == "Completed" and out["error"]
    assert out["result"] is not None and out["result"] >= 400
    (produced,) = fal_sandbox.requests()
    assert produced["status"] == "cancelled"
    assert assert_billed_as_produced(tls_gateway, key_id, key) == []
    events = [e["event"] for e in tls_gateway.ledger(key_id)]
    assert events == ["hold", "release"]


def test_status_stream_and_logs_forms(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    key_id, key = tls_gateway.create_key()
    with tls_gateway.client(key) as client:
        submitted = client.post("/fal/queue/fal-ai/flux/dev", json={"prompt": "x"}).json()
        assert set(submitted) >= {
            "request_id",
            "response_url",
            "status_url",
            "cancel_url",
            "status",
            "queue_position",
        }
        for logs in ("1", "0", "true", "false"):
            status = client.get(submitted["status_url"], params={"logs": logs})
            assert status.status_code in (200, 202) and "logs" in status.json()
        bad = client.get(submitted["status_url"], params={"logs": "maybe"})
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["query", "logs"]
        with client.stream("GET", submitted["status_url"] + "/stream") as stream:
            events = [
                json.loads(line[len("data: ") :])
                for line in stream.iter_lines()
                if line.startswith("data: ")
            ]
        assert events[-1]["status"] == "COMPLETED"
        result = client.get(submitted["response_url"])
    assert (
        result.status_code == 200 and result.headers["x-fal-request-id"] == submitted["request_id"]
    )
    assert_billed_as_produced(tls_gateway, key_id, key)


def test_image_inputs_are_measured_like_v1(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    """Upscale and image-to-image by fal endpoint id: priced from the measured input."""
    key_id, key = tls_gateway.create_key()
    with tls_gateway.client(key) as client:
        made = client.post("/fal/run/fal-ai/flux/dev", json={"prompt": "x", "image_size": "square"})
        source = made.json()["images"][0]["url"]
        upscaled = client.post(
            "/fal/run/fal-ai/topaz/upscale/image", json={"image_url": source, "upscale_factor": 2}
        )
        esrgan = client.post("/fal/run/fal-ai/esrgan", json={"image_url": source, "scale": 4.0})
        edited = client.post(
            "/fal/run/fal-ai/flux/dev/image-to-image",
            json={"image_url": source, "prompt": "winter", "strength": 0.9},
        )
        private = client.post(
            "/fal/run/fal-ai/esrgan", json={"image_url": "http://10.0.0.1/x.png", "scale": 2}
        )
        odd = client.post("/fal/run/fal-ai/esrgan", json={"image_url": source, "scale": 3})
    assert upscaled.status_code == 200, upscaled.text
    assert upscaled.json()["image"]["url"]
    assert upscaled.headers["X-Cost-USD"] == "0.031458"  # 1024x1024 at 0.03 USD/MP
    assert esrgan.status_code == 200, esrgan.text
    assert esrgan.json()["image"]["width"] == 2048
    assert edited.status_code == 200, edited.text
    assert edited.json()["images"][0]["width"] == 512  # flux i2i keeps the input's size
    assert private.status_code == 422 and private.json()["detail"][0]["loc"] == [
        "body",
        "image_url",
    ]
    assert odd.status_code == 422 and odd.json()["detail"][0]["loc"] == ["body", "scale"]
    assert len(assert_billed_as_produced(tls_gateway, key_id, key)) == 4


def test_proxy_refuses_other_hosts_and_storage(
    tls_gateway: TlsGateway, fal_sandbox: Sandbox
) -> None:
    _, key = tls_gateway.create_key()
    with tls_gateway.client(key) as client:
        answers = {
            url: client.post("/fal/proxy", json={"prompt": "x"}, headers={"x-fal-target-url": url})
            for url in (
                "https://example.com/fal-ai/flux/dev",
                "http://fal.run/fal-ai/flux/dev",
                "https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3",
                "https://fal.run/fal-ai/some-uncatalogued-model",
            )
        }
        missing = client.post("/fal/proxy", json={"prompt": "x"})
    codes = {url: r.status_code for url, r in answers.items()}
    assert list(codes.values()) == [400, 400, 400, 404]
    storage = answers["https://rest.fal.ai/storage/upload/initiate?storage_type=fal-cdn-v3"]
    assert "storage" in storage.json()["detail"] and storage.json()["error_type"] == "unsupported"
    assert missing.status_code == 400 and "x-fal-target-url" in missing.json()["detail"]
    assert fal_sandbox.requests() == []


def test_queue_answers_wait_for_nothing(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    """Submit returns while fal still works (202 pending), then the status turns 200."""
    fal_sandbox.configure(latency_ms=1500)
    key_id, key = tls_gateway.create_key()
    with tls_gateway.client(key) as client:
        submitted = client.post("/fal/queue/fal-ai/flux/schnell", json={"prompt": "x"}).json()
        pending = client.get(submitted["status_url"])
        assert pending.status_code == 202 and pending.json()["status"] in (
            "IN_QUEUE",
            "IN_PROGRESS",
        )
        for _ in range(200):
            done = client.get(submitted["status_url"])
            if done.status_code == 200:
                break
            time.sleep(0.05)
    assert done.json()["status"] == "COMPLETED"
    assert_billed_as_produced(tls_gateway, key_id, key)


def test_a_result_fal_failed_to_hand_over_is_still_billed_and_served(
    tls_gateway: TlsGateway, fal_sandbox: Sandbox
) -> None:
    """fal made the images but answered 500 to the first result fetches: the request stays
    pending until the resolver has fal's answer, then completes and is billed; the client
    never sees a failure for work it is charged for."""
    fal_sandbox.configure(
        faults=[{"kind": "error", "scope": "result", "status_code": 500, "count": 4}]
    )
    key_id, key = tls_gateway.create_key()
    out = tls_gateway.python(
        key,
        """
        import json
        import fal_client

        handle = fal_client.submit("fal-ai/flux/dev", arguments={"prompt": "x"})
        result = handle.get()
        print(json.dumps({"id": handle.request_id, "result": result,
                          "final": handle.status().__class__.__name__,
                          "error": handle.status().error}))
        """,
    )
    assert out["final"] == "Completed" and out["error"] is None
    (produced,) = fal_sandbox.requests()
    assert out["result"]["images"][0]["url"] == produced["images"][0]["url"]
    (settle,) = assert_billed_as_produced(tls_gateway, key_id, key)
    assert settle["request_id"] == out["id"]
    (rule,) = httpx.get(f"{fal_sandbox.url}/_sandbox/config", timeout=5).json()["faults"]
    assert rule["hits"] == 4  # the fault was met


def test_idempotent_submit_is_one_job(tls_gateway: TlsGateway, fal_sandbox: Sandbox) -> None:
    key_id, key = tls_gateway.create_key()
    headers = {"Idempotency-Key": "submit-once"}
    with tls_gateway.client(key) as client:
        first = client.post("/fal/queue/fal-ai/flux/dev", json={"prompt": "x"}, headers=headers)
        again = client.post("/fal/queue/fal-ai/flux/dev", json={"prompt": "x"}, headers=headers)
        other = client.post("/fal/queue/fal-ai/flux/dev", json={"prompt": "y"}, headers=headers)
    assert first.status_code == again.status_code == 200
    assert again.json()["request_id"] == first.json()["request_id"]
    assert other.status_code == 409 and other.json()["error_type"] == "idempotency_conflict"
    (settle,) = assert_billed_as_produced(tls_gateway, key_id, key)
    assert settle["request_id"] == first.json()["request_id"]
