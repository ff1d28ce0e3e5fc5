"""docker/: the files are consistent with each other and with the karoo command (docker itself
is not run here)."""

import json
import py_compile
import re
from pathlib import Path

import pytest

from karoo.cli import build_parser

yaml = pytest.importorskip("yaml")
DOCKER = Path(__file__).resolve().parents[2] / "docker"


def stages():
    text = (DOCKER / "Dockerfile").read_text()
    return text, {alias: base for base, alias in re.findall(r"^FROM (\S+) AS (\S+)$", text, re.M)}


def test_dockerfile():
    text, by_name = stages()
    assert set(by_name) == {"runtime", "s3"}
    runtime = text.split("FROM runtime AS s3")[0]
    entry = re.findall(r"^ENTRYPOINT (.*)$", runtime, re.M)[-1]
    assert json.loads(entry)[-1] == "karoo"
    # Everything copied into the image is in the repository and passes the dockerignore.
    root = DOCKER.parent
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    for source in re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, re.M):
        for path in source.split():
            assert (root / path).exists(), path
            assert f"!{path}" in ignore, path
    py_compile.compile(str(DOCKER / "s3-server.py"), doraise=True)


def test_compose():
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    services = compose["services"]
    assert {"redis", "s3", "master-controller"} <= set(services)
    _, by_name = stages()
    for service in services.values():
        if "build" in service:
            assert service["build"]["target"] in by_name
            assert (DOCKER / service["build"]["context"] / service["build"]["dockerfile"]
                    ).exists()
        for volume in service.get("volumes", []):
            assert volume.split(":")[0] in compose["volumes"]
        for dependency in service.get("depends_on", {}):
            assert "healthcheck" in services[dependency]
    master = services["master-controller"]
    args = build_parser().parse_args(master["command"])
    assert args.command == "master-controller" and args.port == 5001
    assert master["ports"] == ["5001:5001"]
    # The S3 credentials the master passes on are those the S3 server is made with.
    assert master["environment"]["AWS_ACCESS_KEY_ID"] == \
        services["s3"]["environment"]["AWS_ACCESS_KEY_ID"]
