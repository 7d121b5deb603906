"""Real storage servers on loopback: moto's S3 server and gcp-storage-emulator.

Clients reach them only through the standard settings, AWS_ENDPOINT_URL and STORAGE_EMULATOR_HOST,
exactly as they would reach a real endpoint.
"""

import contextlib
import itertools
import os
import socket

import pytest

_names = itertools.count()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _environment(env: dict[str, str]):
    """Set variables for a session-scoped server (monkeypatch is function-scoped), then restore them."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def s3_server():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    with _environment(env):
        yield env
    server.stop()


@pytest.fixture(scope="session")
def gcs_server():
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    env = {"STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}", "GOOGLE_CLOUD_PROJECT": "flytetune-test"}
    with _environment(env):
        yield env
    server.stop()


@pytest.fixture
def s3_bucket(s3_server) -> str:
    import boto3

    from flytetune import storage

    storage.reset_clients()
    name = f"test-bucket-{next(_names)}-{os.getpid()}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


@pytest.fixture
def gcs_bucket(gcs_server) -> str:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    from flytetune import storage

    storage.reset_clients()
    name = f"test-bucket-{next(_names)}-{os.getpid()}"
    gcs.Client(project="flytetune-test", credentials=AnonymousCredentials()).create_bucket(name)
    return name
