"""Joining a Ray cluster, or starting a local one on loopback."""
from __future__ import annotations

import os

import ray

LOOPBACK = "127.0.0.1"


def existing_cluster_address() -> str | None:
    """The address ray.init() would join: RAY_ADDRESS (set by `ray job submit`) or a `ray start` head here."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:  # `ray start` records its head in a file; `ray.init()` joins it too.
        from ray._private.services import get_ray_address_from_environment

        # None, not "auto": "auto" also scans for ANY running gcs_server, e.g. another program's
        # in-process cluster, which a training run must not join by accident.
        address = get_ray_address_from_environment(None, None)
        return address or None
    except Exception:  # noqa: BLE001 - no cluster or an internal API change: start a local one
        return None


def connect(num_cpus_needed: float, quiet: bool = False, metrics: bool = True) -> bool:
    """Join the running cluster, else start a local one on loopback. Returns True when we started it.

    Token authentication stays as Ray sets it (on for new clusters). A local cluster gets at least the
    CPUs the run asks for: oversubscribing a laptop is better than a placement group that never fits.
    metrics: start the local cluster with Ray's dashboard (on loopback): every node exports metrics
    either way, but only the dashboard writes the service-discovery file
    (``<temp dir>/prom_metrics_service_discovery.json``) through which Prometheus finds the nodes.
    """
    if ray.is_initialized():
        return False
    if existing_cluster_address():
        # No runtime_env here: under `ray job submit` the job's own (its working_dir) must apply.
        ray.init(logging_level="WARNING" if quiet else "INFO")
        return False
    # Without this Ray rewrites a loopback node address to the routable one and listens on all interfaces.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(
        address="local",
        _node_ip_address=LOOPBACK,
        num_cpus=max(os.cpu_count() or 1, int(num_cpus_needed + 0.999)),
        include_dashboard=metrics,
        dashboard_host=LOOPBACK,
        logging_level="WARNING" if quiet else "INFO",
    )
    return True
