"""Chat templates: jinja2 rendering in a sandbox, with the globals Hugging Face templates expect."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any


def render_chat(template: str, conversation: list[dict], **variables: Any) -> str:
    """Render one conversation (a list of {"role", "content", ...} dicts) with `template`."""
    for index, message in enumerate(conversation):
        if not isinstance(message, dict) or "role" not in message:
            raise ValueError(
                f"chat message {index} is {message!r}; each message must be a dict with a 'role' key "
                "(and usually 'content'), e.g. {'role': 'user', 'content': 'Hi'}"
            )
    messages = [{key: value for key, value in message.items() if value is not None} for message in conversation]
    return _compiled(template).render(messages=messages, **variables)


def cut_after_final_message(rendered: str, conversation: list[dict]) -> str:
    """Drop what the template wrote after the last message's content (continue_final_message)."""
    final = conversation[-1].get("content")
    if not isinstance(final, str) or not final.strip():
        raise ValueError("continue_final_message=True needs a final message with non-empty string 'content'")
    end = rendered.rfind(final.strip())
    if end < 0:
        raise ValueError("continue_final_message=True: the final message's content is not in the rendered chat")
    return rendered[: end + len(final.strip())]


@lru_cache(maxsize=16)
def _compiled(template: str):
    """The template compiled once in an ImmutableSandboxedEnvironment (templates are untrusted text)."""
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _generation_tag(jinja2)]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return environment.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise ValueError(f"the chat template is not valid jinja (line {err.lineno}): {err.message}") from None


def _raise_exception(message: str):
    """What templates call to reject a conversation (e.g. roles out of order)."""
    import jinja2

    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    """JSON without jinja's HTML escaping, with json.dumps' layout options."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_tag(jinja2):
    """An extension accepting `{% generation %}...{% endgeneration %}` (assistant-mask markers); renders the body."""

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(lineno)

        def _render_body(self, caller):
            return caller()

    return GenerationTag
