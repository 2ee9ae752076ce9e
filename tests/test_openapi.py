"""/openapi.json cannot drift: it describes exactly the app's routes and the real job resource."""
from __future__ import annotations

import re

from openapi_spec_validator import validate

from tests.conftest import upload


def described(client) -> dict:
    return client.get("/openapi.json").get_json()


def test_it_is_a_valid_openapi_3_1_document(client):
    document = described(client)
    assert document["openapi"].startswith("3.1")
    validate(document)


def test_every_route_is_described_and_every_description_is_a_route(app, client):
    routes: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", rule.rule)
        routes.setdefault(path, set()).update(method.lower() for method in rule.methods - {"HEAD", "OPTIONS"})
    paths = {path: set(operations) for path, operations in described(client)["paths"].items()}
    assert paths == routes


def test_the_job_schema_is_the_job_resource(client, make_user, stack):
    _, token = make_user()
    job = upload(client, token).get_json()
    schema = described(client)["components"]["schemas"]["Job"]
    assert set(schema["properties"]) == set(job) == set(schema["required"])
