"""Which Ray cluster a run joins: a stale address file left by a dead `ray start` is not joined."""
import os
import socket

import pytest
from ray._private.utils import get_ray_address_file, write_ray_address

from noprop_dist.distributed.cluster import existing_cluster_address, listening


@pytest.fixture
def address_file(monkeypatch):
    """Ray's address file, restored afterwards (a session cluster of the tests may have written one)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    path = get_ray_address_file(None)
    os.makedirs(os.path.dirname(path), exist_ok=True)  # Ray's temp dir exists only once a cluster has started here
    before = open(path).read() if os.path.exists(path) else None
    yield path
    if before is None:
        if os.path.exists(path):
            os.remove(path)
    else:
        write_ray_address(before, None)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: nothing listens there afterwards


def test_a_stale_address_file_is_ignored_with_a_warning(address_file):
    """Bug seen: a driver joined the address of a cluster that had died and waited on it until its timeout."""
    write_ray_address(f"127.0.0.1:{_closed_port()}", None)
    with pytest.warns(UserWarning, match="nothing listens there any more; starting a local cluster"):
        assert existing_cluster_address() is None


def test_a_live_address_in_the_file_is_joined(address_file):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        address = f"127.0.0.1:{server.getsockname()[1]}"
        write_ray_address(address, None)
        assert listening(address) and existing_cluster_address() == address
