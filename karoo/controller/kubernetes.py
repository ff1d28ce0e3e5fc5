"""Kubernetes backend: the objects that run a product on a cluster.

`generate_manifests` turns a product's task graph into plain Kubernetes objects (a ``v1``
``List`` that ``kubectl apply -f`` takes):

- a ConfigMap with the product configuration and the address of every task (``tasks.json``);
- telstate: a ``redis-server`` Pod and its Service;
- the product controller: a Pod running ``karoo product-controller --attach``, which connects
  to the tasks below instead of starting them, writes their ``config.<task>`` keys to telstate
  and drives the capture cycle over KATCP, with its Service;
- one Pod and Service per daemon. Daemons use the host network (multicast SPEAD, as on
  MeerKAT), so each gets its own KATCP port. An init container (``karoo wait-for``) holds the
  daemon back until the controller has written its configuration and the tasks it depends on
  accept KATCP connections: the dependency order of the process backend.

Pods have ``restartPolicy: Never``: as in katsdpcontroller, a task is never restarted inside a
product (deconfigure and configure again). Run it with::

    karoo k8s-manifests product.json --product array_1 --image karoo:latest > array_1.json
    kubectl apply -f array_1.json
    kubectl port-forward pod/array-1-product-controller 5101  # then ?product-configure ...
"""

from __future__ import annotations

import json
import re
from typing import Any

from .graph import ProductGraph

LABEL = "karoo.dev/"
KATCP_BASE_PORT = 2040  # daemons' KATCP ports on the host network: 2040, 2041, ...
PRODUCT_CONTROLLER_PORT = 5101
REDIS_PORT = 6379
DATA_PATH = "/var/kat/data"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def dns_name(*parts: str) -> str:
    """A Kubernetes object name (RFC 1123 label) from product and task names."""
    name = re.sub(r"[^a-z0-9-]+", "-", "-".join(parts).lower()).strip("-")
    if len(name) > 63:
        raise ValueError(f"name {name!r} is longer than the 63 characters Kubernetes allows")
    return name


def _service(name: str, labels: dict[str, str], port: int) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {"selector": labels,
                 "ports": [{"name": "katcp" if port != REDIS_PORT else "redis",
                            "port": port, "targetPort": port, "protocol": "TCP"}]},
    }


def generate_manifests(graph: ProductGraph, *, image: str = "karoo:latest",
                       namespace: str = "default", redis_image: str = "redis:7",
                       data_claim: str | None = None) -> dict[str, Any]:
    """Kubernetes objects for a product.

    Parameters
    ----------
    graph
        The product's task graph (`build_graph`); its store should be an ``s3://`` URL, or a
        directory under ``/var/kat/data`` with `data_claim` giving the volume.
    image
        The karoo image (``docker/Dockerfile``), entry point ``karoo``.
    namespace
        Namespace the Services live in (used in their DNS names).
    redis_image
        Image of the telstate server.
    data_claim
        PersistentVolumeClaim mounted at ``/var/kat/data`` in the writers, cal and the
        controller (local chunk store, RDB files, calibration reports).

    Returns
    -------
    dict
        A ``v1`` ``List`` of the objects.
    """
    product = graph.name
    base = {f"{LABEL}product": product, "app.kubernetes.io/name": "karoo"}
    telstate_name = dns_name(product, "telstate")
    telstate = f"{telstate_name}.{namespace}.svc.cluster.local:{REDIS_PORT}"
    config_map = dns_name(product, "config")
    addresses: dict[str, str] = {}
    ports: dict[str, int] = {}
    for i, task in enumerate(graph.tasks):
        ports[task.name] = KATCP_BASE_PORT + i
        addresses[task.name] = (f"{dns_name(product, task.name)}.{namespace}.svc.cluster.local:"
                                f"{ports[task.name]}")
    volumes: list[dict[str, Any]] = [{"name": "config", "configMap": {"name": config_map}}]
    mounts: list[dict[str, Any]] = [{"name": "config", "mountPath": "/etc/karoo",
                                     "readOnly": True}]
    if data_claim:
        volumes.append({"name": "data", "persistentVolumeClaim": {"claimName": data_claim}})
        mounts.append({"name": "data", "mountPath": DATA_PATH})

    items: list[dict[str, Any]] = [{
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": config_map, "labels": base},
        "data": {
            "product.json": json.dumps(graph.config, indent=1),
            "tasks.json": json.dumps({"telstate": telstate, "tasks": addresses}, indent=1),
        },
    }]
    labels = {**base, f"{LABEL}task": "telstate"}
    items.append({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": telstate_name, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "containers": [{
                "name": "telstate", "image": redis_image,
                "args": ["redis-server", "--save", "", "--appendonly", "no",
                         "--protected-mode", "no"],
                "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
                "readinessProbe": {"tcpSocket": {"port": REDIS_PORT}, "periodSeconds": 2},
            }],
        },
    })
    items.append(_service(telstate_name, labels, REDIS_PORT))

    controller = dns_name(product, "product-controller")
    labels = {**base, f"{LABEL}task": "product-controller"}
    items.append({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": controller, "labels": labels},
        "spec": {
            "restartPolicy": "Never",
            "volumes": volumes,
            "containers": [{
                "name": "product-controller", "image": image,
                "args": ["product-controller", "-a", "0.0.0.0",
                         "-p", str(PRODUCT_CONTROLLER_PORT),
                         "--data-dir", f"{DATA_PATH}/{product}",
                         "--attach", "/etc/karoo/tasks.json"],
                "ports": [{"name": "katcp", "containerPort": PRODUCT_CONTROLLER_PORT}],
                "volumeMounts": mounts,
                "readinessProbe": {"tcpSocket": {"port": PRODUCT_CONTROLLER_PORT},
                                   "periodSeconds": 2},
            }],
        },
    })
    items.append(_service(controller, labels, PRODUCT_CONTROLLER_PORT))

    for task in graph.tasks:
        name = dns_name(product, task.name)
        port = ports[task.name]
        labels = {**base, f"{LABEL}task": dns_name(task.name)}
        wait = ["wait-for", "--telstate", telstate, "--key", f"config.{task.name}"]
        for dep in task.depends_ready:
            wait += ["--tcp", addresses[dep]]
        items.append({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "labels": labels},
            "spec": {
                "restartPolicy": "Never",
                # Multicast SPEAD needs the host's interfaces, as on MeerKAT.
                "hostNetwork": True,
                "dnsPolicy": "ClusterFirstWithHostNet",
                "volumes": volumes,
                "initContainers": [{"name": "wait-for", "image": image, "args": wait}],
                "containers": [{
                    "name": dns_name(task.command), "image": image,
                    "args": [task.command, "--telstate", telstate, "--name", task.name,
                             "-a", "0.0.0.0", "-p", str(port)],
                    "ports": [{"name": "katcp", "containerPort": port, "hostPort": port}],
                    "volumeMounts": mounts,
                    "readinessProbe": {"tcpSocket": {"port": port}, "periodSeconds": 2},
                }],
            },
        })
        items.append(_service(name, labels, port))
    return {"apiVersion": "v1", "kind": "List", "items": items}


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "k8s-manifests", help="print the Kubernetes objects of a product (JSON for kubectl)",
        description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="product configuration JSON file")
    parser.add_argument("--product", required=True, help="product name")
    parser.add_argument("--image", default="karoo:latest", help="karoo image [%(default)s]")
    parser.add_argument("--namespace", default="default", help="namespace [%(default)s]")
    parser.add_argument("--data-claim", default=None,
                        help="PersistentVolumeClaim mounted at /var/kat/data")
    parser.set_defaults(func=run)

    wait = subparsers.add_parser(
        "wait-for", help="wait for a telstate key and TCP endpoints (Kubernetes init container)")
    wait.add_argument("--telstate", required=True, help="telstate endpoint host:port")
    wait.add_argument("--key", action="append", default=[], help="telstate key to wait for")
    wait.add_argument("--tcp", action="append", default=[], help="host:port to wait for")
    wait.add_argument("--timeout", type=float, default=600.0, help="seconds [%(default)s]")
    wait.set_defaults(func=run_wait_for)


def run(args) -> int:
    from .graph import EndpointAllocator, build_graph
    from .schema import validate_config

    with open(args.config) as f:
        config = validate_config(f.read())
    transport = config.get("config", {}).get("transport", "multicast")
    graph = build_graph(args.product, config, allocator=EndpointAllocator(transport),
                        store=f"{DATA_PATH}/store", data_dir=f"{DATA_PATH}/{args.product}")
    manifests = generate_manifests(graph, image=args.image, namespace=args.namespace,
                                   data_claim=args.data_claim)
    print(json.dumps(manifests, indent=1))
    return 0


def run_wait_for(args) -> int:
    import socket
    import time

    from ..service import telstate_url
    from ..telstate import TelescopeState

    deadline = time.monotonic() + args.timeout
    while True:
        missing = []
        try:
            ts = TelescopeState(telstate_url(args.telstate))
            try:
                missing += [k for k in args.key if k not in ts]
            finally:
                ts.close()
        except Exception as exc:  # telstate not up yet
            missing.append(f"telstate ({exc})")
        for endpoint in args.tcp:
            host, _, port = endpoint.rpartition(":")
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
            except OSError:
                missing.append(endpoint)
        if not missing:
            return 0
        if time.monotonic() > deadline:
            print(f"wait-for: still waiting for {', '.join(missing)}")
            return 1
        time.sleep(1)
