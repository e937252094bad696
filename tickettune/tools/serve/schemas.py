"""Requests in, answers out: validation that names the field (400), OpenAI's error shape, the answer bodies.

Pure functions of JSON: no model, no server. Every error is an `ApiError` whose message starts with the path
of the field at fault (`tickets[2].id: duplicated id ...`) and whose `param` is that path, so the `openai` SDK
shows it as OpenAI's own errors do.
"""

from __future__ import annotations

import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any

from tickettune.pipeline.data import Ticket
from tickettune.pipeline.grounding import GENERATED
from tickettune.pipeline.results import Prediction

log = logging.getLogger("tickettune.serve")
MAX_TICKET_CHARS = 100_000      # run.py's hostile-input size: longer tickets are cut, with a warning
MAX_ID_CHARS = 256              # ids are echoed and logged; a longer one is refused
DESK_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # a desk's name: also the OpenAI `model` id
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               500: "server_error", 503: "overloaded_error"}


class ApiError(Exception):
    """An error answer: status, a message that names the field, OpenAI's `param`, extra headers."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": None}}


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return {str: "string", int: "integer", float: "number", list: "array", dict: "object"}.get(type(value), "value")


def bad(where: str, problem: str) -> ApiError:
    return ApiError(400, f"{where}: {problem}", where)


def field_of(obj: dict, name: str, where: str, kind: type | tuple, kind_name: str, required: bool = True) -> Any:
    path = f"{where}.{name}" if where else name
    if name not in obj:
        if required:
            raise bad(path, "missing field")
        return None
    value = obj[name]
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise bad(path, f"must be {kind_name}, got {json_type(value)}")
    return value


def parse_json(body: bytes) -> dict:
    try:
        obj = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise bad("body", f"not valid UTF-8 (byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise bad("body", f"malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise bad("body", f"expected a JSON object, got {json_type(obj)}")
    return obj


def cut_ticket(ticket_id: Any, text: str) -> str:
    if len(text) > MAX_TICKET_CHARS:
        log.warning("ticket %r has %d characters: truncated to %d", ticket_id, len(text), MAX_TICKET_CHARS)
        return text[:MAX_TICKET_CHARS]
    return text


def parse_tickets(obj: dict) -> tuple[str | None, list[Ticket]]:
    """`{"desk"?: str, "tickets": [{"id": str|int, "ticket": str}]}`, every id distinct: (desk, tickets)."""
    desk = field_of(obj, "desk", "", str, "a string (the desk's name)", required=False)
    rows = field_of(obj, "tickets", "", list, "an array of {\"id\", \"ticket\"} objects")
    tickets, first_at = [], {}
    for n, row in enumerate(rows):
        where = f"tickets[{n}]"
        if not isinstance(row, dict):
            raise bad(where, f"must be an object with \"id\" and \"ticket\", got {json_type(row)}")
        tid = field_of(row, "id", where, (str, int), "a string or an integer")
        text = field_of(row, "ticket", where, str, "a string")
        if tid == "":
            raise bad(f"{where}.id", "is empty")
        if isinstance(tid, str) and len(tid) > MAX_ID_CHARS:
            raise bad(f"{where}.id", f"longer than {MAX_ID_CHARS} characters")
        if tid in first_at:
            raise bad(f"{where}.id", f"duplicated id {tid!r} (first at tickets[{first_at[tid]}])")
        first_at[tid] = n
        tickets.append(Ticket(tid, cut_ticket(tid, text)))
    return desk, tickets


@dataclass(frozen=True)
class ChatRequest:
    model: str | None   # the desk, by OpenAI's `model` field
    ticket: str         # the last user message's text
    stream: bool        # answer as server-sent events


def parse_chat(obj: dict) -> ChatRequest:
    """An OpenAI chat request: its `model`, the text of its last user message, and `stream`."""
    model = obj.get("model")
    if model is not None and not isinstance(model, str):
        raise bad("model", f"must be a string, got {json_type(model)}")
    stream = obj.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", f"must be a boolean, got {json_type(stream)}")
    if obj.get("n") not in (None, 1):
        raise bad("n", "only one choice is supported")
    messages = field_of(obj, "messages", "", list, "an array of {\"role\", \"content\"} objects")
    last_user = None
    for n, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{n}]", f"must be an object with \"role\" and \"content\", got {json_type(message)}")
        if field_of(message, "role", f"messages[{n}]", str, "a string") == "user":
            last_user = n
    if last_user is None:
        raise bad("messages", "no message with role \"user\" (the last one is the ticket)")
    where = f"messages[{last_user}]"
    content = field_of(messages[last_user], "content", where, (str, list), "a string or an array of text parts")
    if isinstance(content, list):
        texts = []
        for n, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{where}.content[{n}]", "only {\"type\": \"text\", \"text\": string} parts are supported")
            texts.append(part["text"])
        content = "\n".join(texts)
    return ChatRequest(model, content, bool(stream))


def parse_new_desk(obj: dict) -> tuple[str, str]:
    """The admin route's `{"name": str, "weights": str}`."""
    name = field_of(obj, "name", "", str, "a string")
    if not DESK_NAME.fullmatch(name):
        raise bad("name", f"{name!r}: 1-64 characters of letters, digits, '.', '_', '-', starting with a letter "
                          "or digit")
    return name, field_of(obj, "weights", "", str, "a string (a weights folder on the server)")


# --- answers ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Result:
    prediction: Prediction
    diagnostics: dict
    latency_ms: int             # from the request's arrival to its batch's end (queueing included)
    completion_tokens: int      # tokens of the reply, where the predictor has a tokenizer, else 0


def intent_scores(diagnostics: dict) -> dict[str, float]:
    """The ensemble's probability of each intent, most likely first."""
    probs = diagnostics.get("intent_probs") or {}
    return dict(sorted(probs.items(), key=lambda kv: (-kv[1], kv[0])))


def ticket_answer(result: Result) -> dict:
    p = result.prediction
    return {"id": p.id, "predicted_intent": p.predicted_intent, "prediction": p.prediction,
            "intent_scores": intent_scores(result.diagnostics),
            "reply_source": result.diagnostics.get("reply_action", GENERATED), "latency_ms": result.latency_ms}


def _extras(result: Result) -> dict:
    """What rides along at the top level of a chat answer (and of a stream's first chunk)."""
    return {"intent": result.prediction.predicted_intent, "intent_scores": intent_scores(result.diagnostics),
            "reply_source": result.diagnostics.get("reply_action", GENERATED), "latency_ms": result.latency_ms}


def chat_answer(completion_id: str, model_name: str, result: Result) -> dict:
    p = result.prediction
    completion = result.completion_tokens
    return {
        "id": completion_id, "object": "chat.completion", "created": int(time.time()), "model": model_name,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": p.prediction, "refusal": None},
                     "finish_reason": "stop", "logprobs": None}],
        "usage": {"prompt_tokens": max(p.tokens_used - completion, 0), "completion_tokens": completion,
                  "total_tokens": max(p.tokens_used, completion)},
        "system_fingerprint": None, **_extras(result),
    }


def chat_stream(completion_id: str, model_name: str, result: Result) -> list[str]:
    """The same answer as server-sent events, OpenAI's `chat.completion.chunk`s: the whole reply in one
    content chunk (the intent and scores ride along), a closing chunk with the finish reason and usage,
    then `[DONE]`."""
    created, p = int(time.time()), result.prediction
    head = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model_name,
            "system_fingerprint": None}
    usage = chat_answer(completion_id, model_name, result)["usage"]
    chunks = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": p.prediction},
                              "finish_reason": None, "logprobs": None}], **_extras(result)},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None}], "usage": usage},
    ]
    return [f"data: {json.dumps(c)}\n\n" for c in chunks] + ["data: [DONE]\n\n"]
