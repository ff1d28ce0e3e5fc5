"""The Kubernetes backend: the generated objects checked against the API's rules, and the
product controller's attach mode driving daemons that were started the way the Pods start
them (``karoo wait-for`` first, then the daemon)."""

import asyncio
import json
import re
import shlex
import subprocess

import aiokatcp

from karoo.cli import _required_options_deferred, build_parser
from karoo.controller.graph import build_graph
from karoo.controller.kubernetes import generate_manifests
from karoo.controller.launch import AttachLauncher, karoo_command, karoo_env
from karoo.controller.product import ProductController
from karoo.controller.schema import validate_config
from karoo.telstate import TelescopeState
from karoo.telstate.server import RedisServer, free_port

from .test_product import RECORDER, product_config, sensor

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*"
                       r"[A-Za-z0-9])?$")


def check_manifests(manifests):
    """The rules the API server would enforce on these objects, and their cross-references."""
    assert manifests["apiVersion"] == "v1" and manifests["kind"] == "List"
    items = manifests["items"]
    by_kind = {}
    for item in items:
        assert item["apiVersion"] == "v1"
        assert item["kind"] in ("Pod", "Service", "ConfigMap")
        name = item["metadata"]["name"]
        assert DNS_LABEL.match(name) and len(name) <= 63, name
        for key, value in item["metadata"].get("labels", {}).items():
            assert LABEL_KEY.match(key) and LABEL_VALUE.match(value) and len(value) <= 63
        assert name not in by_kind.setdefault(item["kind"], {}), f"duplicate {name}"
        by_kind[item["kind"]][name] = item
    pods, services, maps = by_kind["Pod"], by_kind["Service"], by_kind["ConfigMap"]
    host_ports = set()
    for pod in pods.values():
        spec = pod["spec"]
        assert spec["restartPolicy"] in ("Never", "OnFailure", "Always")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for volume in volumes.values():
            if "configMap" in volume:
                assert volume["configMap"]["name"] in maps
        containers = spec.get("initContainers", []) + spec["containers"]
        assert len({c["name"] for c in containers}) == len(containers)
        for container in containers:
            assert DNS_LABEL.match(container["name"])
            assert container["image"]
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in volumes
            for port in container.get("ports", []):
                assert 0 < port["containerPort"] < 65536
                if spec.get("hostNetwork"):
                    # Host-network pods may land on one node: their ports must not clash.
                    assert port["containerPort"] not in host_ports
                    host_ports.add(port["containerPort"])
    for service in services.values():
        selected = [p for p in pods.values() if service["spec"]["selector"].items()
                    <= p["metadata"]["labels"].items()]
        assert len(selected) == 1, service["metadata"]["name"]
        ports = {p["containerPort"] for c in selected[0]["spec"]["containers"]
                 for p in c.get("ports", [])}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports
    return pods, services, maps


def test_generated_objects():
    config = validate_config(product_config())
    graph = build_graph("array_1", config, store="s3://archive")
    manifests = generate_manifests(graph, image="karoo:test", namespace="sdp",
                                   data_claim="karoo-data")
    pods, services, maps = check_manifests(json.loads(json.dumps(manifests)))
    [config_map] = maps.values()
    tasks = json.loads(config_map["data"]["tasks.json"])
    assert set(tasks["tasks"]) == {t.name for t in graph.tasks}
    # Every address in tasks.json is a Service of this list, on its port.
    for address in [tasks["telstate"], *tasks["tasks"].values()]:
        host, port = address.rsplit(":", 1)
        service, namespace = host.split(".")[:2]
        assert namespace == "sdp"
        assert int(port) in [p["port"] for p in services[service]["spec"]["ports"]]
    # Every container's command line parses with the karoo command it runs.
    parser = build_parser()
    commands = set(parser._subparsers._group_actions[0].choices)
    daemon_commands = {t.command for t in graph.tasks}
    checked = set()
    for pod in pods.values():
        for container in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            if container["image"] != "karoo:test":
                continue
            args = container["args"]
            if args[0] in commands:
                # As `karoo` parses it: required options may come from telstate.
                with _required_options_deferred(parser):
                    parser.parse_args(args)
                checked.add(args[0])
            else:  # a daemon not merged into this tree yet
                assert args[0] in daemon_commands
    assert {"product-controller", "wait-for"} <= checked
    # The init containers wait for the tasks each daemon depends on.
    ingest = pods["array-1-ingest-sdp-l0-1"]
    wait = ingest["spec"]["initContainers"][0]["args"]
    assert wait[wait.index("--key") + 1] == "config.ingest.sdp_l0.1"
    assert wait[wait.index("--tcp") + 1] == tasks["tasks"]["sim.cbf_baseline_correlation_products"]


def test_manifests_command(tmp_path):
    path = tmp_path / "product.json"
    path.write_text(json.dumps(product_config()))
    out = subprocess.run([*karoo_command(), "k8s-manifests", str(path), "--product", "array_2"],
                         capture_output=True, text=True, env=karoo_env(), check=True).stdout
    check_manifests(json.loads(out))


async def test_attach_mode(tmp_path):
    """The product controller attaches to daemons it did not start, as on Kubernetes."""
    config = validate_config(product_config())
    graph = build_graph("array_1", config, store=str(tmp_path / "store"))
    with RedisServer() as redis:
        tasks = {t.name: f"127.0.0.1:{free_port()}" for t in graph.tasks}
        spec = tmp_path / "tasks.json"
        spec.write_text(json.dumps({"telstate": redis.endpoint, "tasks": tasks}))
        procs = []
        for task in graph.tasks:
            # What the Pod runs: the init container, then the daemon.
            wait = [*karoo_command(), "wait-for", "--telstate", redis.endpoint,
                    "--key", f"config.{task.name}"]
            for dep in task.depends_ready:
                wait += ["--tcp", tasks[dep]]
            daemon = [*RECORDER, task.command, "--telstate", redis.endpoint, "--name",
                      task.name, "-p", tasks[task.name].rsplit(":", 1)[1]]
            procs.append(subprocess.Popen(
                ["sh", "-c", f"{shlex.join(wait)} && exec {shlex.join(daemon)}"],
                env=karoo_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        server = ProductController("127.0.0.1", 0, data_dir=tmp_path,
                                   launcher=AttachLauncher(spec), ready_timeout=60)
        await server.start()
        client = await aiokatcp.Client.connect("127.0.0.1", server.port)
        try:
            await client.request("product-configure", "array_1", json.dumps(config))
            assert await sensor(client, "meta_writer.device-status") == "ok"
            await client.request("capture-init", "1700000100")
            await client.request("capture-done")
            ts = TelescopeState(redis.url)
            try:
                assert ts["test_config.ingest.sdp_l0.2"]["server_id"] == 2
                seen = [tuple(v) for v, _ in ts.get_range("test_requests", st=0)]
            finally:
                ts.close()
            assert ("vis_writer.sdp_l0", "capture-done", "1700000100") in seen
            # A daemon that goes away is noticed through its KATCP connection.
            procs[1].kill()
            for _ in range(200):
                if server.state.name == "ERROR":
                    break
                await asyncio.sleep(0.05)
            assert "lost its KATCP connection" in await sensor(client, "device-status-reason")
            await client.request("product-deconfigure")
        finally:
            client.close()
            await client.wait_closed()
            await server.stop()
            for proc in procs:
                proc.kill()
                proc.wait()
