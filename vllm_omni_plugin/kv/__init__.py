"""KV hand-over from an AR stage running in vLLM to the next stage (`vllm_omni_plugin.kv`).

    layout.py     paged KV cache of any attention backend -> per-token K, V
    store.py      the transfer store: one file per request id (no vLLM imports)
    connector.py  OmniKVConnector, vLLM's v1 connector interface (imports vLLM)
    nixl.py       across hosts: NixlProducer publishes a request's context, NixlConsumer pulls it
                  with one NIXL READ; a handle (JSON) keyed by request id, a lease (no vLLM imports)
    netns.py      two hosts on one machine (network namespaces + a veth pair) for tests and benchmarks

`register_connector()` makes "OmniKVConnector" selectable through
`--kv-transfer-config`; the plugin calls it in every vLLM process.
"""

from __future__ import annotations

CONNECTOR_NAME = "OmniKVConnector"


def register_connector() -> None:
    """Register OmniKVConnector with vLLM's connector factory; idempotent (the factory raises on repeats)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "vllm_omni_plugin.kv.connector", CONNECTOR_NAME)
