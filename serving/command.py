"""storygpt serve --config C [--set k=v] [--host H] [--port P]: the API and web page, locally.

Starts a local Ray, deploys :func:`serving.app.build_app` on ``serve.host:serve.port``
(127.0.0.1 unless told otherwise), prints the URL and serves until Ctrl-C or SIGTERM (either
stops Serve, then the Ray it started). ``--model-uri
models:/<experiment>-aligner/<version>`` (or ``@alias``) serves a registered story model instead:
its trained parts and the config it was trained with come from the MLflow registry
(storygpt/registry.py), ``--set`` adjusts that config. On a cluster use
``serve deploy serving/serve_config.yaml`` instead.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import time

from storygpt.commands import add_config_arguments
from storygpt.config import ConfigError, load_config

from serving.app import APP_NAME, build_app


def add_arguments(p) -> None:
    add_config_arguments(p)
    p.add_argument("--host", help="bind address (default: serve.host, 127.0.0.1 in the presets)")
    p.add_argument("--port", type=int, help="port (default: serve.port)")
    p.add_argument("--char-ldm", help="trained Char-LDM dir (default: models.char_ldm, else the latest export)")
    p.add_argument("--aligner", help="trained aligner dir (default: models.aligner, else the latest export)")
    p.add_argument("--model-uri", help="a registered story model, e.g. models:/storygpt-tiny-aligner/1 or "
                                       "models:/storygpt-tiny-aligner@champion (its config and trained parts)")
    p.add_argument("--tracking-uri", help="the MLflow registry of --model-uri (default: $MLFLOW_TRACKING_URI)")


def run(args) -> int:
    if args.model_uri:
        cfg, args.char_ldm, args.aligner = _registered(args)
    else:
        cfg = load_config(args.config, args.overrides)
    host = args.host or cfg.serve.host
    port = cfg.serve.port if args.port is None else args.port
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port: expected 1..65535, got {port}")
    check_port_free(host, port)
    application = build_app(cfg, args.char_ldm, args.aligner)  # a missing export fails before Ray starts
    url = start(application, host, port)
    # `kill`, systemd, docker stop: the Ctrl-C path below. Set after ray.init, whose own handler
    # exits without stopping Serve first, and two Ray agents outlived the server that way.
    signal.signal(signal.SIGTERM, _interrupt)
    keyed = bool(cfg.serve.api_key or os.environ.get("STORYGPT_API_KEY"))
    if _is_loopback(host) and (exposed := exposed_ports()):
        print(f"note: Ray listens beyond loopback on {len(exposed)} ports ({', '.join(exposed)}): Ray "
              f"{ray_version()} binds its gRPC servers to every interface and cannot be told otherwise; "
              "keep them behind a firewall on a shared or exposed machine (docs/serving.md, Security)", flush=True)
    if not _is_loopback(host):
        print(f"warning: listening on {host}: reachable from other machines"
              + ("" if keyed else " with NO API key (set serve.api_key or $STORYGPT_API_KEY)"), flush=True)
    print(f"StoryGPT-V is serving at {url}  (web page: {url}/, API docs: {url}/docs"
          f"{', X-API-Key required' if keyed else ''}). Ctrl-C to stop.", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping…", flush=True)
    finally:
        stop()
    return 0


def _registered(args):
    """(config, Char-LDM dir, aligner dir) of the story model at ``--model-uri``."""
    import mlflow

    from storygpt.registry import resolve

    given = [flag for flag, value in (("--config", args.config), ("--char-ldm", args.char_ldm),
                                      ("--aligner", args.aligner)) if value]
    if given:
        raise ConfigError(f"--model-uri: the version carries its config and trained parts; drop {', '.join(given)} "
                          "(adjust the config with --set)")
    tracking = args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not tracking:
        raise ConfigError("--tracking-uri: where the registry of --model-uri is (e.g. sqlite:///work_dirs/demo/mlflow.db)"
                          "; or set $MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking)
    model = resolve(args.model_uri, args.overrides)
    if model.aligner is None:
        raise ConfigError(f"--model-uri: '{args.model_uri}' is a {model.stage} model; serving needs a story model "
                          f"(models:/{model.cfg.mlflow.experiment}-aligner/<version>: the aligner and its Char-LDM)")
    return model.cfg, str(model.char_ldm), str(model.aligner)


def start(application, host: str, port: int, ray_init: bool = True) -> str:
    """Deploy ``application`` at ``http://host:port`` (a local Ray unless one is initialised)."""
    import ray
    from ray import serve

    if ray_init and not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, log_to_driver=False, **_ray_network(host))
    serve.start(http_options={"host": host, "port": port})
    serve.run(application, name=APP_NAME, route_prefix="/")
    return f"http://{_url_host(host)}:{port}"


def _ray_network(host: str) -> dict:
    """Serving on loopback: no Prometheus exporter on the Ray agent (its endpoint is unauthenticated
    and listens on every interface). What else Ray opens cannot be moved: ``_node_ip_address=
    "127.0.0.1"`` is turned back into the machine's address by ray.init (2.60), and its gRPC
    servers bind every interface whatever the node address (:func:`exposed_ports` names them)."""
    return {"_system_config": {"enable_metrics_collection": False}} if _is_loopback(host) else {}


def exposed_ports() -> list[str]:
    """``name:port`` of every socket this process and its descendants (the local Ray) listen on
    beyond loopback."""
    import psutil

    found = set()
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            name = proc.name()
            listening = [c for c in proc.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        for conn in listening:
            if not ipaddress.ip_address(conn.laddr.ip).is_loopback:
                found.add(f"{name}:{conn.laddr.port}")
    return sorted(found)


def ray_version() -> str:
    import ray

    return ray.__version__


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def stop() -> None:
    import ray
    from ray import serve

    if ray.is_initialized():
        serve.shutdown()
        ray.shutdown()


def check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as err:
            raise ConfigError(f"serve.port: cannot listen on {host}:{port} ({err.strerror}); "
                              "choose another with --port") from None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _url_host(host: str) -> str:
    if host in ("0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
