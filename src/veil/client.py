"""The client of a ``veil serve`` service; it lives in :mod:`veil.serving.client` (with the service and
the wire format it speaks). Kept here so that ``from veil.client import Client`` goes on working."""

from veil.serving.client import RETRY_STATUSES, Client, ServiceError, load_client_obfuscator

__all__ = ["RETRY_STATUSES", "Client", "ServiceError", "load_client_obfuscator"]
