"""Shared fixtures: tiny model specs, the real digits data, and one real local Ray cluster per session."""
from __future__ import annotations

import subprocess

import psutil
import pytest
import torch

from noprop_dist.core import ModelSpec


def make_spec(embedding: str = "learned", num_shards: int = 4, class_prob: str = "softmax",
              image_shape: tuple[int, int, int] = (1, 8, 8), num_classes: int = 10, *,
              method: str = "noprop_dt", **fields) -> ModelSpec:
    """A small spec for unit tests; ``fields`` set any other ModelSpec field (shard_partition, ...)."""
    c, h, w = image_shape
    d = {"one_hot": num_classes, "learned": 20, "prototype": c * h * w}[embedding]
    return ModelSpec(image_shape=image_shape, num_classes=num_classes, num_shards=num_shards, embedding=embedding,
                     embed_dim=d, dropout=0.1, class_prob=class_prob, radial_sigma=1.0, eta=0.1, abar_max=0.999,
                     method=method, **fields)


@pytest.fixture(scope="session")
def digits():
    from noprop_dist.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="session")
def ray_cluster():
    """A real Ray cluster started in this process, on loopback, with Ray's token authentication as it sets it."""
    import ray

    from noprop_dist.distributed.cluster import keep_on_loopback

    keep_on_loopback()
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=2, include_dashboard=False,
             logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture(autouse=True)
def _torch_threads():
    torch.set_num_threads(1)
    yield


def stop_process_tree(proc: subprocess.Popen, tree: list[psutil.Process] | None = None, timeout: float = 30) -> None:
    """SIGTERM a process a test started, then kill by pid whatever of its tree is left (Ray's daemons).

    ``tree``: its descendants captured earlier (they may have been re-parented since); default: now.
    Never `ray stop`: that would end every Ray process on the machine, other runs' too.
    """
    if tree is None:
        tree = psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else []
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _, alive = psutil.wait_procs(tree, timeout=10)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


def run_main(module, args: list[str]) -> tuple[int, list[str], str]:
    """(exit code, non-empty stderr lines, stdout) of an entry point's ``module.main(args)`` run in this process."""
    import contextlib
    import io

    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        code = module.main(args)
    return code, [ln for ln in err.getvalue().splitlines() if ln.strip()], out.getvalue()


def one_error_line(code: int, lines: list[str], *names: str) -> str:
    """The one ``error:`` line an entry point printed with exit code 2, after checking it names ``names``."""
    assert code == 2, (code, lines)
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]
