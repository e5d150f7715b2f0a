"""OpenAI's request, response, stream-chunk and error shapes for `tanuki serve`, as pydantic models.

Why one module of plain data: the official ``openai`` client (and distilabel, NeMo Data Designer, curl
scripts written against OpenAI) parse these shapes field by field, so they are written down once, in
OpenAI's names, and app.py only fills them in.

Requests are validated *strictly* (a string where a number belongs is a 400, never coerced: "1" is
not a temperature) and fields we do not know are ignored (``user``, ``metadata``, ``store``, vendor
extensions). Serialization keeps OpenAI's explicit nulls (``"logprobs": null``, ``"finish_reason":
null``) except where OpenAI omits a key: a delta carries only what changed, and a stream chunk has
``usage`` only when the client asked for it (``stream_options.include_usage``).
"""
from __future__ import annotations

import re
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, allow_inf_nan=False)


# ------------------------------------------------------------------------------------- requests

class TextPart(_Request):
    type: Literal["text"]
    text: str


class ImageURL(_Request):
    url: str
    detail: str | None = None


class ImagePart(_Request):
    type: Literal["image_url"]
    image_url: ImageURL | str


ContentPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(_Request):
    include_usage: bool | None = None


class _Sampling(_Request):
    """Fields chat and completions share. ``top_k`` is an extension (vLLM's); -1 and 0 mean off."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = None
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


# ------------------------------------------------------------------------------------- errors

class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


_TYPE_NAMES = {"str", "int", "float", "bool", "none", "dict", "list"}


def _where(loc) -> str | None:
    """pydantic's error location as an OpenAI ``param``: ``messages[0].content``; union-branch labels
    ('str', 'list[int]', 'tagged-union[...]') are dropped."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[A-Za-z_]\w*", part) and part not in _TYPE_NAMES:
            out += ("." if out else "") + part
    return out or None


def validation_message(err: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the most specific error (the deepest location: for a union that is the
    branch the input came closest to)."""
    errors = err.errors(include_url=False)
    e = max(errors, key=lambda x: len(x["loc"]))
    if e["type"] == "json_invalid":
        return f"the request body is not valid JSON: {e['msg'].removeprefix('Invalid JSON: ')}", None
    param = _where(e["loc"])
    if param is None:
        return f"the request body must be a JSON object: {e['msg']}", None
    return f"{param}: {e['msg']}", param


# ------------------------------------------------------------------------------------- responses

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class ChatMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class _Envelope(BaseModel):
    """What every response and stream chunk carries around its choices (``object`` names the kind)."""

    id: str
    object: str
    created: int
    model: str
    system_fingerprint: None = None


class ChatCompletion(_Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    """Only what this chunk adds: ``{"role": "assistant", "content": ""}`` first, then
    ``{"content": ...}``, and ``{}`` on the chunk that carries ``finish_reason``."""

    role: str | None = None
    content: str | None = None

    @model_serializer
    def _present(self) -> dict:
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatChunk(_Envelope):
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(_Envelope):
    """A completions response, and (same object name, as OpenAI) a completions stream chunk."""

    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tanuki"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def sse(chunk: BaseModel, include_usage: bool) -> str:
    """One server-sent event; ``usage`` is a key of every chunk (null until the last) only when the
    client asked for it, as OpenAI does."""
    body = chunk.model_dump_json(exclude=None if include_usage else {"usage"})
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"
