"""Starting vLLM's engine for a worker: its settings, and CrescentConnector's configuration when it moves the KV.

The connector (services/worker/vllm_connector.py, class ``CrescentConnector``) is loaded by vLLM by module path;
this module only decides whether to name it and fills its ``kv_connector_extra_config`` (the #16 contract):
``{"internal_token", "timeout_s", "block_size", "conductor_address", "instance_id"}``.
"""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

from crescent.services.worker.settings import WorkerServiceSettings

log = logging.getLogger(__name__)

CONNECTOR_NAME = "CrescentConnector"
CONNECTOR_MODULE = "crescent.services.worker.vllm_connector"


def connector_available() -> bool:
    """True when CrescentConnector's module is installed (vLLM imports it in its own processes)."""
    try:
        return importlib.util.find_spec(CONNECTOR_MODULE) is not None
    except ImportError:
        return False


def connector_spec(settings: WorkerServiceSettings, instance_id: str) -> Any:
    """The ConnectorSpec for ``settings`` (None: KV stays inside vLLM); raises ValueError when the connector is
    asked for and missing."""
    from crescent.engine.vllm_engine import ConnectorSpec

    choice = settings.vllm_kv_connector
    if choice == "none":
        return None
    if not connector_available():
        if choice == "crescent":
            raise ValueError(f"vllm_kv_connector=crescent but {CONNECTOR_MODULE} is not installed; set "
                             "vllm_kv_connector=none (or auto) to serve without the kvstore")
        log.warning("%s is not installed: vLLM's KV stays in its engine (a disaggregated decode recomputes the "
                    "prompt)", CONNECTOR_MODULE)
        return None
    extra = {"internal_token": settings.internal_token_value(), "timeout_s": settings.kvstore_timeout_s,
             "block_size": settings.kv_block_size, "conductor_address": settings.conductor_address,
             "instance_id": instance_id}
    return ConnectorSpec(CONNECTOR_NAME, CONNECTOR_MODULE, extra)


async def start_vllm_engine(settings: WorkerServiceSettings, instance_id: str) -> Any:
    """A started VllmEngine for ``settings`` (minutes on a small CPU: vLLM loads and profiles the model)."""
    try:
        import vllm  # noqa: F401 - fail here, with the fix, rather than deep inside the engine

        from crescent.engine.vllm_engine import VllmEngine
    except ImportError as exc:
        raise ValueError(f"engine=vllm needs the vllm package in this Python ({exc}): run the worker with "
                         ".venv-vllm/bin/python (`make vllm`), or use engine=crescent") from exc
    from crescent.services.worker.vllm_kv_events import kv_events_endpoint

    # vLLM's prefix-cache events reach the conductor's index (services/worker/vllm_kv_events.py)
    events = kv_events_endpoint(instance_id) if settings.conductor_address else ""
    return await VllmEngine.start(settings, connector_spec(settings, instance_id), events)
