"""Joining a Ray cluster, or starting a local one on loopback; what its workers need to import a user's block."""
from __future__ import annotations

import dataclasses
import os
import signal
import site
import socket
import stat
import subprocess
import sys
import sysconfig
import threading
import types
import warnings
from collections.abc import Callable
from pathlib import Path

import ray

from ..config import ConfigError
from ..core import ModelSpec
from ..core.blocks import block_factory

LOOPBACK = "127.0.0.1"
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's switch: "token" (authentication on) or "disabled"
TOKEN_FILE = Path.home() / ".ray" / "auth_token"  # where Ray keeps the token it generates


def require_token_auth(allow_unauthenticated: bool) -> None:
    """Turn Ray's token authentication on explicitly (not by Ray's default alone), or refuse to go on when
    the environment turns it off, unless the config allows that (``cluster.allow_unauthenticated``)."""
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is None:
        os.environ[AUTH_MODE_ENV] = "token"
        # Ray's C++ config has already read the environment (at import): have it read it again, as Ray's
        # own default-on switch does. Child processes (raylet, workers) get the variable anyway.
        from ray._raylet import Config as RayConfig

        RayConfig.initialize("")
    elif mode.lower() != "token":
        what = (f"{AUTH_MODE_ENV}={mode} turns Ray's token authentication off: anyone who reaches the "
                "cluster's ports could run code on it")
        if not allow_unauthenticated:
            raise ConfigError(f"{what}; unset it, or set cluster.allow_unauthenticated=true to accept that")
        warnings.warn(f"{what}; going on because cluster.allow_unauthenticated is true", stacklevel=2)


def protect_token_file(path: Path = TOKEN_FILE) -> None:
    """The token is a password: readable by its owner only (Ray writes it with the process's umask)."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        path.chmod(stat.S_IRUSR | stat.S_IWUSR)


def existing_cluster_address() -> str | None:
    """The address ray.init() would join: RAY_ADDRESS (set by `ray job submit`) or a `ray start` head here."""
    if os.environ.get("RAY_ADDRESS"):
        return os.environ["RAY_ADDRESS"]
    try:  # `ray start` records its head in a file; `ray.init()` joins it too.
        from ray._private.services import get_ray_address_from_environment

        # None, not "auto": "auto" also scans for ANY running gcs_server, e.g. another program's
        # in-process cluster, which a training run must not join by accident.
        address = get_ray_address_from_environment(None, None)
    except Exception:  # noqa: BLE001 - no cluster or an internal API change: start a local one
        return None
    if address and not listening(address):
        # The file outlives its cluster (a crash, a killed `ray start`): joining would wait on a dead address.
        warnings.warn(f"ignoring the Ray address {address} recorded by an earlier `ray start`: nothing listens "
                      "there any more; starting a local cluster", stacklevel=2)
        return None
    return address or None


def _local_cluster_gpus() -> float | None:
    """The GPUs a local cluster started by this process would have, counted before it starts as Ray counts them
    when it does (its accelerator detection, CUDA_VISIBLE_DEVICES, RAY_OVERRIDE_RESOURCES); None where Ray's
    counting, a private API, cannot be asked (the count after the start then decides alone)."""
    try:
        from ray._private.resource_and_label_spec import ResourceAndLabelSpec

        return float(ResourceAndLabelSpec().resolve(is_head=True, node_ip_address=LOOPBACK).num_gpus)
    except Exception:  # noqa: BLE001 - another Ray's internals: no early answer, not an error
        return None


def _on_loopback(address: str) -> bool:
    """Whether a Ray address (``host:port``, or ``http://host:port`` as `ray job submit` sets it) is loopback."""
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


@ray.remote(num_cpus=0)
def _cluster_auth_mode() -> str:
    """RAY_AUTH_MODE as the cluster's own processes run it (a task inherits its raylet's environment)."""
    from ray._private.authentication.authentication_utils import get_authentication_mode_name
    from ray._raylet import get_authentication_mode

    return get_authentication_mode_name(get_authentication_mode())


def require_cluster_token_auth(allow_unauthenticated: bool, timeout: float = 60.0) -> None:
    """Refuse (ConfigError, one line) to run on a joined cluster whose own processes run without token
    authentication: this process's setting says nothing about the cluster's (``require_token_auth`` reads only
    the local environment), and anyone who reaches an unauthenticated cluster's ports can run code on it.
    A probe task that cannot run at all (workers of an unauthenticated cluster cannot talk to a driver that
    requires a token) is taken as the same answer."""
    try:
        mode = ray.get(_cluster_auth_mode.remote(), timeout=timeout)
    except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as e:
        mode = f"unknown ({type(e).__name__}: a task could not run there)"
    if mode == "token":
        return
    what = f"the Ray cluster joined runs with token authentication {mode if mode != 'disabled' else 'off'}"
    if allow_unauthenticated:
        warnings.warn(f"{what}; going on because cluster.allow_unauthenticated is true", stacklevel=2)
        return
    ray.shutdown()
    raise ConfigError(f"{what}: anyone who reaches its ports could run code on it; start it with RAY_AUTH_MODE=token "
                      "(docs/deploying.md), or set cluster.allow_unauthenticated=true to accept that")


def listening(address: str, timeout: float = 2.0) -> bool:
    """Whether something accepts TCP connections at ``host:port``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


def keep_on_loopback() -> None:
    """Have the local cluster this process is about to start listen on 127.0.0.1 only, whatever the user's shell
    exported and whenever Ray was imported.

    Ray's switch is ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``: with it, a node's loopback address stays loopback;
    without it Ray rewrites 127.0.0.1 to the machine's routable address and its processes listen on every
    interface. Ray reads the variable once, into ``ray_constants.ENABLE_RAY_CLUSTER``, when ``ray`` is first
    imported, which in a user's program may be long before this call: so the constant is set here too (it is read
    at call time), and the variable for the processes ray.init starts (GCS, raylet, agents, workers), which read it
    afresh. Only for a cluster this process starts: a driver that joins a multi-node cluster must keep its
    routable address.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def connect(num_cpus_needed: float, quiet: bool = False, dashboard: bool = True,
            allow_unauthenticated: bool = False,
            before_local_start: Callable[[float | None], None] | None = None) -> bool:
    """Join the running cluster, else start a local one on loopback. Returns True when we started it.

    Token authentication is required (:func:`require_token_auth`), and the token file is made readable by
    its owner only (:func:`protect_token_file`). A local cluster gets at least the
    CPUs the run asks for: oversubscribing a laptop is better than a placement group that never fits.
    dashboard: start the local cluster with Ray's dashboard (on loopback). Two things need it: Prometheus
    (every node exports metrics either way, but only the dashboard writes the service-discovery file
    ``<temp dir>/prom_metrics_service_discovery.json`` through which Prometheus finds the nodes), and Ray
    Train, whose placement-group cleaner asks the state API (served by the dashboard) whether the train
    controller lives and, without an answer, takes it for dead and removes the workers' placement group.
    before_local_start: called, when a local cluster is about to start, with the GPUs it would have (None: not
    known before it starts); what it raises stops the start, so that a refusal costs no start and no shutdown.
    """
    if ray.is_initialized():
        return False
    require_token_auth(allow_unauthenticated)
    protect_token_file()
    address = existing_cluster_address()
    if address:
        if _on_loopback(address):  # a head on this machine's loopback: the driver must keep to loopback too
            keep_on_loopback()
        # No runtime_env here: under `ray job submit` the job's own (its working_dir) must apply.
        ray.init(logging_level="WARNING" if quiet else "INFO")
        require_cluster_token_auth(allow_unauthenticated)
        return False
    if before_local_start is not None:
        before_local_start(_local_cluster_gpus())
    keep_on_loopback()
    ray.init(
        address="local",
        _node_ip_address=LOOPBACK,
        num_cpus=max(os.cpu_count() or 1, int(num_cpus_needed + 0.999)),
        include_dashboard=dashboard,
        dashboard_host=LOOPBACK,
        logging_level="WARNING" if quiet else "INFO",
    )
    protect_token_file()  # Ray may just have written it
    _interrupt_on_sigterm()
    _start_reaper()
    return True


def _start_reaper() -> None:
    """The watchdog that stops this local cluster if the driver dies without shutting it down (reaper.py); in a
    session of its own, so that a signal to the driver's process group does not take it too."""
    subprocess.Popen([sys.executable, "-m", "noprop_dist.distributed.reaper", str(os.getpid())],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


# SIGTERM's handler before this process started its cluster, restored when it shuts the cluster down.
_PREVIOUS_SIGTERM: list = []


def _interrupt_on_sigterm() -> None:
    """A SIGTERM (``kill``, a container stopping) to a process that started its own cluster ends the run as
    Ctrl-C does: a KeyboardInterrupt, so the run's ``finally`` blocks shut the cluster down. Ray's own handler
    aborts the process, which leaves GCS, raylet and agents running and listening. SIGKILL cannot be caught."""
    if threading.current_thread() is not threading.main_thread():
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    _PREVIOUS_SIGTERM.append(signal.signal(signal.SIGTERM, interrupt))


def disconnect(started: bool) -> None:
    """Shut down the cluster :func:`connect` started (``started``), and give SIGTERM back its handler."""
    if not started:
        return
    ray.shutdown()
    if _PREVIOUS_SIGTERM and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _PREVIOUS_SIGTERM.pop())


def _installed(module: types.ModuleType) -> bool:
    """Whether every worker imports ``module`` as the driver does: noprop_dist itself (the workers run it), or a
    module in an installed location (site-packages, the standard library). A module from the user's own
    directory is not: a local cluster's workers find the driver's working directory, a remote node's do not."""
    if module.__name__.split(".")[0] == __name__.split(".")[0]:
        return True
    path = getattr(module, "__file__", None)
    if not path:
        return True  # built in or frozen
    roots = {sysconfig.get_paths()[k] for k in ("purelib", "platlib", "stdlib", "platstdlib")}
    roots |= set(site.getsitepackages()) | {site.getusersitepackages()}
    real = os.path.realpath(path)
    return any(os.path.commonpath([real, os.path.realpath(r)]) == os.path.realpath(r) for r in roots if r)


def ship_block(spec: ModelSpec) -> ModelSpec:
    """The spec with its block factory resolved, ready to send to the workers: a factory from the user's own
    module (the working directory, a `ray job submit --working-dir`, a function given to the Python API) travels
    by value, with its module's functions and classes, so the workers need no PYTHONPATH and no copy of the file;
    one from an installed package travels by reference and is imported there."""
    factory = block_factory(spec)
    module = sys.modules.get(getattr(factory, "__module__", "") or "")
    if module is not None and module.__name__ != "__main__" and not _installed(module):
        top = module.__name__.split(".")[0]  # the whole package: the factory may use its sibling modules
        ray.cloudpickle.register_pickle_by_value(sys.modules[top])
    return dataclasses.replace(spec, block_factory=factory)
