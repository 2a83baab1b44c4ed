"""What text reaches the model for a request: train/serve parity.

The router always sees the raw input (a completion's prompt, a chat's last user message). The model sees:
  1. the task's prompt template around the raw input, tokenised exactly as in training (no special tokens),
     when the request goes to a task trained with ``prompt:``/``completion:`` (its top task for a blend) and
     the request is a plain prompt or a chat of one user message (system messages aside);
  2. otherwise (language-modelling tasks, Theta, chats of several turns): a chat request's messages through
     the tokenizer's chat template; a plain prompt through the chat template when ``chat`` is set (the
     default of ``borahub generate`` and of /v1/chat/completions), else as plain text (``--no-chat``, and
     /v1/completions, whose prompt is the text to continue).
An input longer than the budget keeps its last tokens (with a warning) before any wrapping.
"""
from __future__ import annotations

import logging

from tasks.data import fill_template

log = logging.getLogger("borahub")


class Prompter:
    """Turns (raw input or messages, the adapter that will serve it) into token ids."""

    def __init__(self, tokenizer, templates: dict[str, str] | None = None):
        self.tok, self.templates = tokenizer, dict(templates or {})

    def _truncate(self, text: str, budget: int, where: str) -> tuple[str, bool]:
        body = self.tok(text, add_special_tokens=False, verbose=False)["input_ids"]
        if len(body) <= budget:
            return text, False
        log.warning("%s: %d tokens, kept the last %d", where, len(body), budget)
        return self.tok.decode(body[-budget:]), True

    def encode(self, text: str, task: str | None, *, chat: bool, budget: int, where: str,
               messages: list[dict] | None = None) -> tuple[list[int], bool]:
        """(token ids, whether the input was truncated). ``messages``: a chat request (``text`` is its last user
        message); ``task``: the adapter's task (None or Theta: no template)."""
        tok = self.tok
        template = self.templates.get(task) if task is not None else None
        turns = [m for m in messages or [] if m.get("role") != "system"]
        if template is not None and (messages is None or len(turns) == 1):
            text, cut = self._truncate(text, budget, where)
            return tok(fill_template(template, text), add_special_tokens=False)["input_ids"] or self._start(), cut
        if messages is None:
            text, cut = self._truncate(text, budget, where)
            if not chat:
                return tok(text)["input_ids"] or self._start(), cut
            messages = [{"role": "user", "content": text}]
        else:  # the last user message is the input: it is what gets truncated
            messages = list(messages)
            last = max(i for i, m in enumerate(messages) if m.get("role") == "user")
            content, cut = self._truncate(messages[last]["content"], budget, where)
            messages[last] = {**messages[last], "content": content}
        if tok.chat_template:
            wrapped = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return tok(wrapped, add_special_tokens=False)["input_ids"], cut
        joined = "\n".join(m["content"] for m in messages)  # no chat template: the turns as plain text
        return tok(joined)["input_ids"] or self._start(), cut

    def chat_prefix(self) -> list[int]:
        """The token ids every one-turn chat prompt starts with (the chat template's system turn and the user
        turn's opening): the common start of two templated prompts; [] without a chat template."""
        tok = self.tok
        if not tok.chat_template:
            return []
        texts = [tok.apply_chat_template([{"role": "user", "content": c}], tokenize=False, add_generation_prompt=True)
                 for c in ("Qx", "Zy")]
        before = texts[0][: texts[0].index("Qx")]  # the text ahead of the user's content
        a, b, head = (tok(t, add_special_tokens=False)["input_ids"] for t in (*texts, before))

        def common(x, y):
            return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))

        return a[: min(common(a, b), common(a, head))]

    def _start(self) -> list[int]:
        """An empty prompt starts from BOS (or EOS)."""
        tok = self.tok
        return [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
