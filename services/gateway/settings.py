"""The gateway's settings (flags ``--name`` or env ``CRESCENT_NAME``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from crescent.settings import CrescentSettings


class GatewaySettings(CrescentSettings):
    """OpenAI-compatible HTTP front: tokenizes, asks the conductor for a placement, relays decode's tokens."""

    port: int = Field(8000, description="HTTP port of the OpenAI API.")
    conductor_address: str = Field("127.0.0.1:50051", description="The conductor's gRPC host:port.")
    model: str = Field("default", description="Model name or folder: its tokenizer, chat template and context length.")
    served_model_name: str = Field("", description="Model id clients send and the KV hash seed; empty = from --model.")
    kv_block_size: int = Field(16, description="Tokens per KV block (must equal the workers').", ge=1)
    max_model_len: int = Field(0, description="Context length in tokens; 0 = the model config's.", ge=0)
    default_max_tokens: int = Field(512, description="Completion length when a chat request gives none.", ge=1)
    max_n: int = Field(8, description="Largest `n` (choices per request) accepted.", ge=1)
    api_key: str = Field("", description="If set, requests need `Authorization: Bearer <key>` (else 401).")
    request_timeout_s: float = Field(600.0, description="Upper bound on one request, prefill + decode.", gt=0)
    rpc_timeout_s: float = Field(10.0, description="Deadline of the conductor's Place/Finish calls.", gt=0)
    ready_poll_s: float = Field(1.0, description="How often readiness (conductor + instances) is re-checked.", gt=0)
    model_watch_interval_s: float = Field(5.0, ge=0, description="When model is a published model directory: how "
                                                                 "often to look for a newer version to hash "
                                                                 "prompts under (0 = never).")

    def model_id(self) -> str:
        """The served name: explicit, or the model folder's name (``default`` stays ``default``)."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if ("/" in self.model or Path(self.model).is_dir()) else self.model
