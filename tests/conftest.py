"""Fixtures for every test; the helpers themselves live in support.py."""

from redis_server import redis_server  # noqa: F401
from support import gateway_client, gateway_process, make_config  # noqa: F401
