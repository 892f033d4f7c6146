"""pytest fixtures of the integration tests: one cluster per run (`cluster`) and a fresh database
with the extension per test (`db`). The cluster itself, the test keys and the helpers the tests
import are in tests/support/psap_cluster.py (shared with the benchmark).
"""
import itertools
import os
import re
from pathlib import Path

import pytest
from psap_cluster import KEY1, KEY2, Cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    base = Path("/tmp") / f"psap-it-{os.getpid()}"
    c = Cluster(base, 5491, ["log_min_messages = warning", "max_wal_senders = 4", "wal_level = replica"])
    c.destroy()
    c.start()
    c.set_keys({"v1": KEY1, "v2": KEY2}, "v1")
    yield c
    c.destroy()


_counter = itertools.count()


@pytest.fixture
def db(cluster, request):
    """A fresh database with the extension, dropped afterwards; keys reset to v1+v2, current v1."""
    name = "t_" + re.sub(r"[^a-z0-9_]+", "_", request.node.name.lower())[:40] + f"_{next(_counter)}"
    cluster.set_keys({"v1": KEY1, "v2": KEY2}, "v1")
    with cluster.connect() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        c.execute(f'CREATE DATABASE "{name}"')
    with cluster.connect(dbname=name) as c:
        c.execute("CREATE EXTENSION psap_encrypt")
    yield name
    with cluster.connect() as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
