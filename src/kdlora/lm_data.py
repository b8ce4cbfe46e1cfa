"""A causal LM's training rows: a prompt and its completion (the loss on the completion's tokens only), a chat
`messages` list rendered with the tokenizer's own chat template (the loss on the last assistant turn), or a plain
text (the loss on every token); and the check that a teacher and a student share a vocabulary.

A row becomes (input_ids, labels) with labels IGNORE where no loss is taken; the model shifts them itself
(transformers' causal LMs predict labels[t + 1] from input_ids[..t])."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kdlora.errors import KdloraError
from kdlora.losses import IGNORE


@dataclass(frozen=True)
class LMRow:
    id: int
    prompt: str | None = None  # with completion: the loss on the completion only
    completion: str | None = None
    messages: Sequence[dict[str, str]] | None = None  # chat turns; the last one, the assistant's, is learnt
    text: str | None = None  # every token learnt


def encode(row: LMRow, tokenizer: Any, max_length: int) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one row, at most max_length tokens. A prompt too long loses its start (the completion
    is what is learnt and what the teacher's cache holds); a completion too long loses its end."""
    if row.text is not None:
        ids = tokenizer(row.text, add_special_tokens=True, truncation=True, max_length=max_length)["input_ids"]
        return ids, list(ids)
    if row.messages is not None:
        prompt, completion = render_chat(row.messages, tokenizer, row.id)
        special = False  # the template writes its own special tokens
    elif row.prompt is not None and row.completion is not None:
        prompt, completion, special = row.prompt, row.completion, True
    else:
        raise KdloraError(f"row {row.id}: give a prompt and a completion, chat messages, or a text")
    head = tokenizer(prompt, add_special_tokens=special)["input_ids"]
    tail = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not tail or tail[-1] != tokenizer.eos_token_id):
        tail = [*tail, tokenizer.eos_token_id]  # the student learns to stop
    if not tail:
        raise KdloraError(f"row {row.id}: the completion is empty")
    tail = tail[:max_length]
    head = head[len(head) - (max_length - len(tail)) :] if len(head) + len(tail) > max_length else head
    return [*head, *tail], [IGNORE] * len(head) + tail


def render_chat(messages: Sequence[dict[str, str]], tokenizer: Any, row: int) -> tuple[str, str]:
    """(the conversation up to the last turn with the template's generation prompt, the last turn as the template
    writes it), so that the prompt's tokens and the completion's are the template's own."""
    if not messages or messages[-1].get("role") != "assistant":
        raise KdloraError(f"row {row}: the messages must end with the assistant's turn, the one that is learnt")
    if not getattr(tokenizer, "chat_template", None):
        raise KdloraError("the tokenizer has no chat template: give --prompt-column and --completion-column instead")
    full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise KdloraError(f"row {row}: the chat template does not write the conversation as its prompt plus a turn")
    # What the template writes after the turn's end (a newline before the next turn) is not the answer: a model
    # that learnt it would be taught to go on after it has stopped.
    return prompt, full[len(prompt) :].rstrip()


def shared_vocabulary(teacher: Any, student: Any, teacher_rows: int, student_rows: int) -> tuple[int, str | None]:
    """The vocabulary size both models' logits are compared on, and a notice when padding rows are cut. Tokenizers
    are compared by their tokens and special tokens, not by size: models of one tokenizer may pad their output matrix
    to different sizes (Qwen2.5's come with 151,936 and 152,064 rows), rows no token reaches. A real mismatch
    (another token at an id, another special token) is one line."""
    tv, sv = teacher.get_vocab(), student.get_vocab()
    if tv != sv:
        diff = sorted(set(tv.items()) ^ set(sv.items()))[:3]
        raise KdloraError(
            f"the teacher's and the student's tokenizers differ ({len(tv)} and {len(sv)} tokens; e.g. "
            f"{', '.join(f'{t!r}: {i}' for t, i in diff)}): distilling token by token needs one vocabulary"
        )
    for name in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"):
        if getattr(teacher, name, None) != getattr(student, name, None):
            raise KdloraError(f"the tokenizers' {name[:-3].replace('_', ' ')}s differ: "
                              f"{getattr(teacher, name, None)} and {getattr(student, name, None)}")  # fmt: skip
    used = max(tv.values()) + 1
    if min(teacher_rows, student_rows) < used:
        raise KdloraError(f"a model has fewer output rows ({min(teacher_rows, student_rows)}) than its tokenizer "
                          f"has tokens ({used})")  # fmt: skip
    if teacher_rows == student_rows == used:
        return used, None
    return used, (
        f"the logits are compared on the {used} rows the tokenizer uses; the padding rows past them "
        f"(teacher {teacher_rows}, student {student_rows}) are cut"
    )
