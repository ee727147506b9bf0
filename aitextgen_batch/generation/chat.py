"""Chat messages to prompt text, with the tokenizer's chat template (or one given in a file).

A row's messages are the OpenAI / Hugging Face shape: a list of `{"role": ..., "content": ...}`. They are
rendered with `add_generation_prompt=True`, so the text ends where the assistant's reply begins, and the
engine then treats the rendered text like any prompt. A malformed row gets a message naming what is
wrong (it becomes that row's error); a missing template is refused before any work starts.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..config import unicode_error
from ..errors import UserError

ROLES = ("system", "user", "assistant", "tool")


def message_error(messages) -> str | None:
    """What is wrong with a row's messages, or None when they are a valid conversation."""
    if not isinstance(messages, (list, tuple)):
        return f"messages must be a list of {{role, content}} objects, got {type(messages).__name__}"
    if not messages:
        return "messages is an empty list: give at least one {role, content} message"
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return f"message {i} must be a {{role, content}} object, got {type(m).__name__}"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return f"message {i} has role {role!r}; use one of {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {i} ({role}) content must be a string, got {type(content).__name__}"
        if (err := unicode_error(content)) is not None:
            return f"message {i} ({role}) content is not valid Unicode ({err})"
    return None


class ChatRenderer:
    """Renders conversations with one template and an optional system prompt."""

    def __init__(
        self,
        tokenizer,
        template_file: str | Path | None = None,
        system_prompt: str | None = None,
        *,
        template: str | None = None,
    ):
        """Check the template (a broken or missing one is refused here, before any row).

        Args:
            template_file: a Jinja chat template file, instead of the tokenizer's template.
            system_prompt: a system message put first in every conversation that has none.
            template: the template's text (a job's actors get the one its driver read), instead of either.
        """
        if template is not None:
            self.template = template
        elif template_file is not None:
            self.template = read_template(template_file)
        else:
            self.template = getattr(tokenizer, "chat_template", None)
        if not self.template:
            raise UserError(
                "the model's tokenizer has no chat template, so chat messages cannot be rendered: pass "
                "--chat-template FILE (a Jinja template), or use plain prompts without --chat/--messages-column"
            )
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        from jinja2 import TemplateSyntaxError

        try:  # a broken template fails every row: refuse it before any work
            self.probe = self.render([{"role": "user", "content": "probe"}])
        except TemplateSyntaxError as exc:
            where = (
                "the job's chat template"
                if template is not None
                else f"--chat-template {str(template_file)!r}"
                if template_file
                else "the tokenizer's chat template"
            )
            raise UserError(f"{where} is not a valid Jinja template: {exc}") from exc

    @property
    def template_sha256(self) -> str:
        """Identifies the template in a job's identity (a rerun with another template is refused)."""
        return hashlib.sha256(self.template.encode("utf-8")).hexdigest()

    def render(self, messages) -> tuple[str | None, str | None]:
        """(prompt text, None), or (None, what is wrong with the row)."""
        err = message_error(messages)
        if err is not None:
            return None, err
        messages = [{"role": m["role"], "content": m["content"]} for m in messages]
        if self.system_prompt is not None and messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        from jinja2 import TemplateError, TemplateSyntaxError

        try:
            text = self.tokenizer.apply_chat_template(
                messages, chat_template=self.template, add_generation_prompt=True, tokenize=False
            )
        except TemplateSyntaxError:
            raise
        except TemplateError as exc:  # the template's own raise_exception(), e.g. roles that must alternate
            return None, f"the chat template refused this row's messages: {exc}"
        except Exception as exc:  # whatever else the template raises on one row is that row's error
            return None, f"the chat template failed on this row's messages ({type(exc).__name__}: {exc})"
        return text, None

    def refuses_every_row(self, every_row_is_one_user_message: bool) -> str | None:
        """Why every row of the job would be an error row, found by the probe render, or None.

        The probe is one user message with the system prompt: the conversation of every `--chat` row, and the start
        of every conversation a `--system-prompt` goes into.
        """
        _, err = self.probe
        if err is None or not (every_row_is_one_user_message or self.system_prompt is not None):
            return None
        given = " with --system-prompt" if self.system_prompt is not None else ""
        return (
            f"{err.replace('this row', 'every row')} (probed with one user message{given}): every row would be an "
            "error row. Fix the template" + (", or leave out --system-prompt" if given else "")
        )

    def render_user(self, prompt) -> tuple[str | None, str | None]:
        """A plain prompt as a single user message (`--chat`)."""
        if not isinstance(prompt, str):
            return None, f"prompt must be a string, got {type(prompt).__name__}"
        return self.render([{"role": "user", "content": prompt}])


def read_template(template_file: str | Path) -> str:
    """A chat template file's text (UTF-8, a leading BOM dropped).

    Raises:
        UserError: not a file, not UTF-8 (naming the byte), or empty.
    """
    path = Path(template_file)
    where = f"--chat-template {str(path)!r}"
    if not path.is_file():
        raise UserError(f"{where} is not a file; give a Jinja chat template file")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(f"{where} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"{where} is empty; give a Jinja chat template (as aitextgen_batch/assets/chat_template.jinja)")
    return text
