"""Static checks of compose.yaml, the Dockerfile and the Procfile (no Docker engine here)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
SECRET_WORDS = re.compile(r"(?i)(secret|password|passphrase|access_key|token)\s*[:=]\s*\S")


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
    assert services["worker"]["command"][:5] == ["-A", "tasks.app", "worker", "-Q", "parts,wal"]


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
    assert "celery -A tasks.app worker -Q parts,wal" in entries["worker"]
    assert "celery -A tasks.app flower" in entries["flower"]
