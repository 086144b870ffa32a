"""Split inference as a service: the server side of a run behind FastAPI/uvicorn (``veil serve``), the
obfuscator as ONNX for non-Python clients (``veil export-client``). The Python client is
:class:`veil.serving.client.Client` (also ``veil.client.Client``) (``veil query``)."""

from veil.serving.app import ServeConfig, create_app, serve
from veil.serving.split import SPLITS, ServerSide, load_server_side

__all__ = ["SPLITS", "ServeConfig", "ServerSide", "create_app", "load_server_side", "serve"]
