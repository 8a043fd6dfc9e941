"""vLLM's ``POST /tokenize`` and ``POST /detokenize``: load clients use them to size prompts exactly.

They answer from the gateway's tokenizer alone (no cluster needed), off the event loop like every tokenization.
"""

from __future__ import annotations

from fastapi import APIRouter, Request

from crescent.services.gateway.errors import ERROR_RESPONSES, ApiError
from crescent.services.gateway.routes import GatewayState
from crescent.services.gateway.schema import DetokenizeRequest, TokenizeRequest
from crescent.services.gateway.tools import template_messages
from crescent.services.gateway.unsupported import check_message

router = APIRouter(responses=ERROR_RESPONSES)


def _state(request: Request, model: str | None) -> GatewayState:
    st: GatewayState = request.app.state.gateway
    if model is not None and model != st.model_id:
        raise ApiError(404, f"model {model!r} does not exist; this server serves {st.model_id!r}", param="model",
                       code="model_not_found")
    return st


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    st = _state(request, body.model)
    encoder = st.encoder
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of prompt and messages", param="prompt")
    if body.messages is not None:
        if body.add_special_tokens:
            raise ApiError(400, "add_special_tokens applies to a prompt; the chat template places special tokens",
                           param="add_special_tokens")
        for i, message in enumerate(body.messages):
            check_message(i, message)
        messages = template_messages(body.messages, None, encoder.template_knows_tools)  # as chat renders them
        ids = await st.offload(encoder.chat_ids, messages, body.add_generation_prompt)
    else:
        ids = await st.offload(encoder.text_ids, body.prompt, body.add_special_tokens)
    token_strs = [encoder.token_str(t) for t in ids] if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": encoder.max_model_len, "tokens": ids, "token_strs": token_strs}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    st = _state(request, body.model)
    return {"prompt": await st.offload(st.encoder.detokenize, body.tokens)}
