"""A causal LM's rows: the loss on the completion only (or on the assistant's last turn, rendered by the tokenizer's
own chat template, or on every token of a text), truncation that keeps the completion, and one vocabulary for the
teacher and the student whatever their padding rows."""

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from kdlora.errors import KdloraError
from kdlora.lm_data import LMRow, encode, shared_vocabulary
from kdlora.losses import IGNORE

WORDS = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "is", "the", "cat", "good", "yes", "no", "?"]
TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|> ' + m['content'] + ' ' }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)


def tokenizer(words=WORDS, eos="</s>"):
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=eos, pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip
    fast.chat_template = TEMPLATE
    return fast


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_the_loss_is_on_the_completion_and_its_end_of_text_only():
    tok = tokenizer()
    input_ids, labels = encode(LMRow(0, prompt="is the cat good ?", completion="yes"), tok, 32)
    assert input_ids == [*ids(tok, "is the cat good ?"), *ids(tok, "yes"), tok.eos_token_id]
    assert labels == [IGNORE] * 5 + [*ids(tok, "yes"), tok.eos_token_id]


def test_a_long_prompt_loses_its_start_and_the_completion_is_kept():
    tok = tokenizer()
    input_ids, labels = encode(LMRow(0, prompt="the cat is good ? is the cat good ?", completion="no"), tok, 4)
    assert input_ids == [*ids(tok, "good ?"), *ids(tok, "no"), tok.eos_token_id]
    assert labels == [IGNORE, IGNORE, *ids(tok, "no"), tok.eos_token_id]


def test_chat_messages_are_rendered_by_the_template_and_the_last_turn_is_learnt():
    tok = tokenizer()
    messages = [{"role": "user", "content": "is the cat good ?"}, {"role": "assistant", "content": "yes"}]
    input_ids, labels = encode(LMRow(0, messages=messages), tok, 32)
    full = tok.apply_chat_template(messages, tokenize=True)
    full = full["input_ids"] if hasattr(full, "keys") else full  # a BatchEncoding in newer transformers
    assert input_ids == list(full)
    learnt = [t for t in labels if t != IGNORE]
    assert learnt == [*ids(tok, "yes"), tok.eos_token_id]  # the assistant's words and its end, not the user's turn
    assert labels[: input_ids.index(tok.convert_tokens_to_ids("<|assistant|>")) + 1] == [IGNORE] * (
        input_ids.index(tok.convert_tokens_to_ids("<|assistant|>")) + 1
    )
    with pytest.raises(KdloraError, match="must end with the assistant's turn"):
        encode(LMRow(1, messages=messages[:1]), tok, 32)


def test_what_the_template_writes_after_the_last_turn_is_not_learnt():
    from kdlora.lm_data import render_chat

    tok = tokenizer()
    tok.chat_template = TEMPLATE.replace("{{ eos_token }} ", "{{ eos_token }}\n")  # ChatML's newline after each end
    messages = [{"role": "user", "content": "is the cat good ?"}, {"role": "assistant", "content": "yes"}]
    prompt, completion = render_chat(messages, tok, 0)
    assert completion == "yes </s>" and prompt.endswith("<|assistant|> ")


def test_a_plain_text_learns_every_token():
    tok = tokenizer()
    input_ids, labels = encode(LMRow(0, text="the cat is good"), tok, 32)
    assert labels == input_ids and len(input_ids) >= 4


def test_one_vocabulary_whatever_the_padding_rows():
    teacher, student = tokenizer(), tokenizer()
    assert shared_vocabulary(teacher, student, len(WORDS), len(WORDS)) == (len(WORDS), None)
    size, notice = shared_vocabulary(teacher, student, 64, 32)
    assert size == len(WORDS) and "padding rows" in notice and "teacher 64, student 32" in notice
    other = tokenizer([*WORDS[:-1], "!"])
    with pytest.raises(KdloraError, match="tokenizers differ .*'\\?': 12|tokenizers differ .*'!': 12"):
        shared_vocabulary(teacher, other, 13, 13)
    with pytest.raises(KdloraError, match="eos tokens differ"):
        shared_vocabulary(teacher, tokenizer(eos="<unk>"), 13, 13)
    with pytest.raises(KdloraError, match="fewer output rows"):
        shared_vocabulary(teacher, student, 13, 8)
