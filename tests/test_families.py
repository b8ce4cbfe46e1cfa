"""The paper's three pairs end to end, as pairs, each with the tokenizer kind its family uses; a pair whose tokenizers
differ; decoder-only classifiers. Tiny models and tokenizers built in-process: FFT teacher -> smaller student ->
KD-LoRA -> the merged model answers in pipeline()."""

import json

import pytest
from conftest import WORDS, make_tokenizer, tiny_bert_config
from test_own_data import _rows, write

from kdlora.cli import main

TEXTS = [" ".join(WORDS[i : i + 6]) + " ." for i in range(len(WORDS))] * 4
SMALL = dict(hidden_size=32, num_attention_heads=2, intermediate_size=37, max_position_embeddings=66)


def bpe_tokenizer(directory, pad=True):
    """Byte-level BPE (RoBERTa's kind), trained here on the test words."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import RobertaTokenizerFast

    directory.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXTS, vocab_size=400, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"])  # fmt: skip
    bpe.save_model(str(directory))
    tok = RobertaTokenizerFast.from_pretrained(str(directory))  # reads vocab.json and merges.txt on every version
    assert len(tok) > 100
    if not pad:  # as decoder checkpoints ship: no pad token
        tok.pad_token = None
    return tok


def unigram_tokenizer(directory):
    """A SentencePiece Unigram model (DeBERTa-v3's kind), trained here with `tokenizers`."""
    from tokenizers import SentencePieceUnigramTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[CLS]", "[SEP]", "[UNK]", "[MASK]"]
    sp = SentencePieceUnigramTokenizer()
    sp.train_from_iterator(TEXTS, vocab_size=120, special_tokens=special, unk_token="[UNK]")
    cls, sep = sp.token_to_id("[CLS]"), sp.token_to_id("[SEP]")
    sp.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=sp._tokenizer, pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]",
        mask_token="[MASK]",
    )  # fmt: skip


def save(directory, model_cls, config, tokenizer):
    import torch

    torch.manual_seed(0)
    model_cls(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Pretrained-style checkpoints (no task head) of each family, with their tokenizers."""
    from transformers import (
        BertModel,
        DebertaV2Config,
        DebertaV2Model,
        DistilBertConfig,
        DistilBertModel,
        LlamaConfig,
        LlamaModel,
        Qwen2Config,
        Qwen2Model,
        RobertaConfig,
        RobertaModel,
    )

    root = tmp_path_factory.mktemp("families")
    wordpiece = make_tokenizer(root / "wp")
    bpe = bpe_tokenizer(root / "bpe")
    unigram = unigram_tokenizer(root / "unigram")
    no_pad = bpe_tokenizer(root / "bpe-nopad", pad=False)
    v_bpe, v_uni = len(bpe), len(unigram)
    roberta = dict(vocab_size=v_bpe, pad_token_id=1, bos_token_id=0, eos_token_id=2, type_vocab_size=1, **SMALL)
    deberta = dict(vocab_size=v_uni, relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
                   pad_token_id=0, type_vocab_size=0, **SMALL)  # fmt: skip
    decoder = dict(vocab_size=v_bpe, hidden_size=32, intermediate_size=37, num_attention_heads=2, num_key_value_heads=1,
                   max_position_embeddings=64, bos_token_id=0, eos_token_id=2)  # fmt: skip
    distil = dict(vocab_size=len(wordpiece), dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64)
    return {
        "bert": save(root / "bert", BertModel, tiny_bert_config(), wordpiece),
        "distilbert": save(root / "distilbert", DistilBertModel, DistilBertConfig(**distil), wordpiece),
        "roberta": save(root / "roberta", RobertaModel, RobertaConfig(num_hidden_layers=4, **roberta), bpe),
        "distilroberta": save(root / "distilroberta", RobertaModel, RobertaConfig(num_hidden_layers=2, **roberta), bpe),
        "deberta": save(root / "deberta", DebertaV2Model, DebertaV2Config(num_hidden_layers=4, **deberta), unigram),
        "deberta-small": save(
            root / "deberta-small", DebertaV2Model, DebertaV2Config(num_hidden_layers=2, **deberta), unigram
        ),
        "llama": save(root / "llama", LlamaModel, LlamaConfig(num_hidden_layers=4, **decoder), no_pad),
        "qwen2": save(root / "qwen2", Qwen2Model, Qwen2Config(num_hidden_layers=4, **decoder), no_pad),
    }


@pytest.fixture(scope="module")
def pair_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    rows = [{**r, "other": "the cat ."} for r in _rows(48)]
    return write(root / "train.csv", rows), write(root / "dev.csv", rows[:16])


def distil(tmp_path, checkpoints, pair_data, teacher, *student):
    """FFT teacher -> KD-LoRA student on a sentence-pair task; returns the run directory."""
    train, dev = pair_data
    out = tmp_path / "run"
    argv = ["train", "--method", "kd-lora", "--teacher-model", str(checkpoints[teacher]), *student]
    argv += ["--train-file", str(train), "--validation-file", str(dev), "--text-columns", "body,other"]
    argv += ["--label-column", "tag", "--epochs", "1", "--batch-size", "16", "--quiet", "--output-dir", str(out)]
    assert main(argv) == 0
    return out


def answers(out, pair=True):
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(out / "merged"))
    text = {"text": "the good cat .", "text_pair": "the cat ."} if pair else "the good cat ."
    result = clf(text)
    return (result[0] if isinstance(result, list) else result)["label"]


# Every linear layer but the head (the default, all-linear), and the paper's query/value (--preset paper).
ALL_LINEAR = {
    "distilbert": {"q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"},
    "distilroberta": {"query", "key", "value", "output.dense", "intermediate.dense"},
    # DeBERTa's disentangled attention has its own position projections
    "deberta-small": {"query_proj", "key_proj", "value_proj", "pos_query_proj", "pos_key_proj"}
    | {"output.dense", "intermediate.dense"},
}


@pytest.mark.parametrize(
    "teacher, student, preset, targets",
    [
        ("bert", "distilbert", "default", ALL_LINEAR["distilbert"]),  # BERT-base -> DistilBERT: WordPiece
        ("bert", "distilbert", "paper", {"q_lin", "v_lin"}),
        ("roberta", "distilroberta", "default", ALL_LINEAR["distilroberta"]),  # RoBERTa -> DistilRoBERTa: BPE
        ("roberta", "distilroberta", "paper", {"query", "value"}),
        ("deberta", "deberta-small", "default", ALL_LINEAR["deberta-small"]),  # DeBERTa-v3: SentencePiece Unigram
        ("deberta", "deberta-small", "paper", {"query_proj", "value_proj"}),
    ],
)
def test_the_papers_pairs_end_to_end(tmp_path, checkpoints, pair_data, teacher, student, preset, targets):
    out = distil(tmp_path, checkpoints, pair_data, teacher, "--model", str(checkpoints[student]), "--preset", preset)
    metrics = json.loads((out / "metrics.json").read_text())
    teacher_metrics = json.loads((out / "teacher" / "metrics.json").read_text())
    assert metrics["status"] == "finished" and metrics["total_params"] < teacher_metrics["total_params"]
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == targets
    assert answers(out) in ("neg", "pos")


def test_a_pair_whose_tokenizers_differ(tmp_path, checkpoints, pair_data):
    """WordPiece teacher, byte-level BPE student: each tokenizes the text itself; the teacher's logits travel with
    the example id, so nothing is aligned by tokens."""
    out = distil(tmp_path, checkpoints, pair_data, "bert", "--model", str(checkpoints["distilroberta"]))
    assert json.loads((out / "merged" / "config.json").read_text())["model_type"] == "roberta"
    assert json.loads((out / "teacher" / "merged" / "config.json").read_text())["model_type"] == "bert"
    assert answers(out) in ("neg", "pos")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_decoder_only_teacher_and_student_from_its_layers(tmp_path, checkpoints, pair_data, family):
    """A decoder classifier without a pad token: its eos pads, `score` trains, the student keeps `model.layers` 0, 2.
    Attention relations work with grouped-query attention (keys and values narrower than queries)."""
    out = distil(tmp_path, checkpoints, pair_data, family, "--student-layers", "0,2", "--attention-weight", "1")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["attention_layer"] == 4 and metrics["attention_heads"] == 2
    assert metrics["train_loss_attention"][0] > 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    every_linear = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert set(adapter["target_modules"]) == every_linear and "score" in adapter["modules_to_save"]
    config = json.loads((out / "merged" / "config.json").read_text())
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    assert config["num_hidden_layers"] == 2 and config["pad_token_id"] == tokenizer.eos_token_id is not None
    assert len(config.get("layer_types") or [0, 0]) == 2
    assert answers(out) in ("neg", "pos")


@pytest.mark.parametrize("family", ["bert", "distilbert", "roberta", "deberta", "llama", "qwen2"])
def test_attention_projections_of_each_family(checkpoints, family):
    """--attention-weight reads each family's query, key and value projections (GQA: keys/values narrower)."""
    from kdlora.models import attention_projections, build_model
    from kdlora.tasks import get_task

    model, _ = build_model(str(checkpoints[family]), get_task("mrpc"), "fft", weights=False)
    widths = [m.out_features for m in attention_projections(model, -1)]
    assert widths == ([32, 16, 16] if family in ("llama", "qwen2") else [32, 32, 32])
