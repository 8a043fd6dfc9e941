"""The gateway's settings (flags ``--name`` or env ``CRESCENT_NAME``)."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator

from crescent.services.gateway.tool_parsers import PARSERS
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
    max_prompts: int = Field(32, description="Most prompts in one /v1/completions request (a list prompt); each "
                                             "prompt x n is one placement at the conductor.", ge=1)
    max_body_bytes: int = Field(4 << 20, description="Largest request body in bytes; a larger one is answered 413 "
                                                     "before it is read.", ge=1024)
    tokenizer_threads: int = Field(2, description="Threads that tokenize and render chat templates, off the event "
                                                  "loop (health and streams keep answering meanwhile).", ge=1)
    api_key: str = Field("", description="If set, requests need `Authorization: Bearer <key>` (else 401); "
                                         "/health and /metrics stay open.")
    api_key_file: str = Field("", description="A file of API keys, one a line (a mounted Kubernetes Secret); "
                                              "accepted besides api_key. Read at start.")
    cors_allow_origins: list[str] = Field(default_factory=list, description="Origins browsers may call the API "
                                                                            "from (`*` = any); empty = no CORS "
                                                                            "headers.")
    cors_allow_credentials: bool = Field(False, description="Whether CORS lets browsers send cookies and "
                                                            "Authorization (not with origin `*`).")
    tool_call_parser: str = Field(
        "", description="How tool_choice 'auto' finds tool calls in the model's text (as vLLM's "
        "--tool-call-parser): 'hermes' (<tool_call>{json}</tool_call>: Hermes, Qwen2, SmolLM2); 'none' = 'auto' is "
        "refused (400); '' = from the chat template (hermes when it writes <tool_call> tags or does not know tools, "
        "else none).")
    request_timeout_s: float = Field(600.0, description="Upper bound on one request, prefill + decode.", gt=0)
    resume_timeout_s: float = Field(
        60.0, description="A request whose prefill or decode worker dies resumes on another (or the restarted) "
        "one from the tokens already sent, waiting at most this long for a placement; 0 = fail it instead.", ge=0)
    rpc_timeout_s: float = Field(10.0, description="Deadline of the conductor's Place/Finish calls.", gt=0)
    keep_alive_timeout_s: float = Field(
        75.0, description="How long an idle keep-alive connection stays open. Longer than clients' and proxies' own "
        "idle expiry (httpx/openai 5 s, nginx and cloud load balancers 60 s), so the client, not the server, closes "
        "it: a server closing at the client's expiry races the client's next request, which then fails with a "
        "reset connection.", gt=0)
    ready_poll_s: float = Field(1.0, description="How often readiness (conductor + instances) is re-checked.", gt=0)
    model_watch_interval_s: float = Field(5.0, ge=0, description="When model is a published model directory: how "
                                                                 "often to look for a newer version to hash "
                                                                 "prompts under (0 = never).")

    @field_validator("tool_call_parser")
    @classmethod
    def _known_parser(cls, value: str) -> str:
        if value not in ("", "none", *PARSERS):
            raise ValueError(f"tool_call_parser {value!r} is not one of: '', none, {', '.join(sorted(PARSERS))}")
        return value

    def api_keys(self) -> list[str]:
        """Every accepted key: ``api_key`` and the lines of ``api_key_file`` (blank lines and ``#`` comments
        skipped). A configured but unreadable or empty file is an error: starting open would be a silent hole."""
        keys = [self.api_key] if self.api_key else []
        if self.api_key_file:
            lines = Path(self.api_key_file).read_text().splitlines()
            from_file = [k.strip() for k in lines if k.strip() and not k.strip().startswith("#")]
            if not from_file:
                raise ValueError(f"api_key_file {self.api_key_file} holds no key")
            keys += from_file
        return keys

    def model_id(self) -> str:
        """The served name: explicit, or the model folder's name (``default`` stays ``default``)."""
        if self.served_model_name:
            return self.served_model_name
        return Path(self.model).name if ("/" in self.model or Path(self.model).is_dir()) else self.model
