"""Tiny in-process models, a tokenizer from a word list, and small GLUE-format fixtures: no network, no weights."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

GLUE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "glue"

WORDS = (
    "the a cat dog bird sees likes hates runs sleeps good bad big small red blue green quickly slowly "
    "and or not very is was man woman child tree house car book eats reads"
).split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ",", '"', "?"]


def make_tokenizer(directory: Path):
    from transformers import BertTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    # from_pretrained reads vocab.txt on every transformers version; the constructor's argument was renamed in v5
    # (vocab_file -> vocab), and the old name is silently ignored there, leaving a vocabulary of special tokens only.
    tokenizer = BertTokenizerFast.from_pretrained(str(directory), do_lower_case=True)
    assert tokenizer.convert_tokens_to_ids("cat") != tokenizer.unk_token_id
    return tokenizer


def tiny_bert_config(**kw):
    from transformers import BertConfig

    base = dict(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        type_vocab_size=2,
    )
    return BertConfig(**{**base, **kw})


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A pretrained-style checkpoint: a 4-layer BertModel (no task head) with its tokenizer."""
    import torch
    from transformers import BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    BertModel(tiny_bert_config()).save_pretrained(directory)
    make_tokenizer(directory).save_pretrained(directory)
    return directory


def _sentence(rng: random.Random, good: bool) -> str:
    words = [rng.choice(WORDS[:8]) for _ in range(rng.randint(3, 9))]
    words.insert(rng.randint(0, len(words)), "good" if good else "bad")
    return " ".join(words) + " ."


def write_glue(root: Path, n_train: int = 96, n_dev: int = 32, seed: int = 0) -> Path:
    """CoLA, MRPC, STS-B and RTE in the original GLUE formats, with their quirks, and a learnable signal."""
    rng = random.Random(seed)
    for task in ("CoLA", "MRPC", "STS-B", "RTE"):
        (root / task).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("dev", n_dev)):
        labels = [rng.random() < 0.5 for _ in range(n)]
        sents = [_sentence(rng, y) for y in labels]
        # CoLA: no header; source, label, original mark, sentence
        (root / "CoLA" / f"{split}.tsv").write_text(
            "".join(f"src\t{int(y)}\t\t{s}\n" for y, s in zip(labels, sents, strict=True))
        )
        # MRPC: a UTF-8 BOM and bare quote characters inside the sentences
        rows = "".join(
            f'{int(y)}\t{i}\t{i + 1}\t" {s}\tthe " {s2}\n'
            for i, (y, s, s2) in enumerate(zip(labels, sents, reversed(sents), strict=True))
        )
        (root / "MRPC" / f"{split}.tsv").write_text("\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n" + rows)
        # STS-B: float scores
        rows = "".join(
            f"{i}\tg\tf\ty\t{i}\tn\tn\t{s}\t{s}\t{4.5 * y + rng.random() * 0.5:.3f}\n"
            for i, (y, s) in enumerate(zip(labels, sents, strict=True))
        )
        header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
        (root / "STS-B" / f"{split}.tsv").write_text(header + rows)
        # RTE: string labels
        rows = "".join(
            f"{i}\t{s}\tthe cat .\t{'entailment' if y else 'not_entailment'}\n"
            for i, (y, s) in enumerate(zip(labels, sents, strict=True))
        )
        (root / "RTE" / f"{split}.tsv").write_text("index\tsentence1\tsentence2\tlabel\n" + rows)
    (root / "CoLA" / "test.tsv").write_text(
        "index\tsentence\n" + "".join(f"{i}\t{_sentence(rng, i % 2 == 0)}\n" for i in range(10))
    )
    (root / "RTE" / "test.tsv").write_text(
        "index\tsentence1\tsentence2\n" + "".join(f"{i}\t{_sentence(rng, i % 2 == 0)}\tthe dog .\n" for i in range(10))
    )
    return root


def train_argv(glue: Path, out: Path, *extra: str) -> list[str]:
    """`kdlora train` arguments for a lora run on CoLA from the fixtures; `extra` adds or overrides flags. The lr is
    given (tests of --lr auto say so): a range test would only lengthen every other test."""
    argv = ["train", "--method", "lora", "--task", "cola", "--lr", "2e-3", "--data-dir", str(glue)]
    return [*argv, "--output-dir", str(out), *extra]


def poison_task_loss(monkeypatch, at: int) -> dict[str, int]:
    """Make the `at`-th call of the task loss NaN; returns the call counter (set its "n" to 0 to start again)."""
    import kdlora.kinds

    calls = {"n": 0}
    real = kdlora.kinds.task_loss

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == at else loss

    monkeypatch.setattr(kdlora.kinds, "task_loss", poisoned)  # what every kind's task loss calls
    return calls


@pytest.fixture(scope="session")
def tiny_glue(tmp_path_factory) -> Path:
    return write_glue(tmp_path_factory.mktemp("glue"))


@pytest.fixture
def real_glue() -> Path:
    if not (GLUE_DIR / "CoLA" / "train.tsv").is_file():
        pytest.skip(f"real GLUE data not found at {GLUE_DIR}")
    return GLUE_DIR
