"""Static checks of compose.yaml, the Dockerfile and the Procfile (no Docker engine here).

compose.yaml is validated against the Compose specification's JSON schema, which `make setup`
fetches (scripts/setup.sh), and its commands are the Procfile's word for word; the tests start
workers and Flower from the Procfile's lines (devrig.services, tests/tasks/test_flower.py), so
every command compose.yaml runs is one some test runs.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from devrig.services import procfile_command

ROOT = Path(__file__).resolve().parents[1]
SECRET_WORDS = re.compile(r"(?i)(secret|password|passphrase|access_key|token)\s*[:=]\s*\S")
COMPOSE_SCHEMA = ROOT / ".cache" / "compose-spec" / "compose-spec.json"


def load_compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_defines_broker_workers_and_flower() -> None:
    services = load_compose()["services"]
    assert set(services) >= {"redis", "worker", "flower"}
    for name in ("worker", "flower"):
        assert services[name]["build"] == "."
        assert services[name]["entrypoint"] == ["celery"]
        assert services[name]["environment"]["CLOUD_DUMP_BROKER_URL"] == "redis://redis:6379/0"
        assert services[name]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["worker"]["command"][:5] == [
        "-A", "tasks.app", "worker", "-Q", "${WORKER_QUEUES:-parts,wal}"
    ]  # fmt: skip


def compose_validator() -> jsonschema.Draft7Validator:
    """A validator of the Compose specification's schema (JSON Schema draft 7, its $schema)."""
    if not COMPOSE_SCHEMA.is_file():
        pytest.fail(f"no Compose schema at {COMPOSE_SCHEMA}: run `make setup`", pytrace=False)
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    assert "draft-07" in schema["$schema"]
    jsonschema.Draft7Validator.check_schema(schema)
    return jsonschema.Draft7Validator(schema)


def test_compose_follows_the_compose_specification() -> None:
    errors = [f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
              for e in compose_validator().iter_errors(load_compose())]  # fmt: skip
    assert errors == []


def test_the_compose_schema_refuses_what_compose_would() -> None:
    # The check can fail: a misspelt key and a wrongly typed value are refused.
    validator = compose_validator()
    broken = load_compose()
    broken["services"]["flower"]["enviroment"] = {}
    broken["services"]["worker"]["depends_on"] = 7
    assert len(list(validator.iter_errors(broken))) == 2


@pytest.mark.parametrize("service", ["worker", "flower"])
def test_compose_runs_the_procfile_commands(service: str) -> None:
    compose = load_compose()["services"][service]
    assert compose["entrypoint"] + compose["command"] == shlex.split(procfile_command(service))


def test_compose_build_context_has_what_the_dockerfile_copies() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (\S+)", dockerfile, flags=re.M):
        assert (ROOT / source).exists(), f"Dockerfile copies missing '{source}'"


def test_flower_is_published_on_loopback_only() -> None:
    ports = load_compose()["services"]["flower"]["ports"]
    assert all(str(p).startswith("127.0.0.1:") for p in ports)


def test_no_credentials_inline_in_deploy_files() -> None:
    for name in ("compose.yaml", "Dockerfile", "Procfile"):
        text = (ROOT / name).read_text()
        assert not SECRET_WORDS.search(text), f"{name} holds what looks like a credential"


def test_procfile_worker_consumes_both_queues() -> None:
    entries = dict(
        line.split(":", 1) for line in (ROOT / "Procfile").read_text().splitlines()
        if line and not line.startswith("#")
    )
    assert set(entries) == {"worker", "flower"}
    assert "celery -A tasks.app worker -Q ${WORKER_QUEUES:-parts,wal}" in entries["worker"]
    assert "celery -A tasks.app flower --conf=tasks/flowerconfig.py" in entries["flower"]


def test_flower_logins_come_from_a_compose_secret_never_a_literal() -> None:
    compose = load_compose()
    flower = compose["services"]["flower"]
    assert flower["secrets"] == ["flower_basic_auth"]
    assert flower["environment"]["FLOWER_BASIC_AUTH_FILE"] == "/run/secrets/flower_basic_auth"
    assert set(compose["secrets"]["flower_basic_auth"]) == {"file"}
    assert "FLOWER_BASIC_AUTH" not in flower["environment"]
    for name in ("compose.yaml", "Procfile"):
        assert not re.search(r"(?i)basic[-_]auth[ \t]*[=:][ \t]*\S+:", (ROOT / name).read_text())
