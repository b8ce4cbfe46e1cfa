from collections import Counter

import pytest
import torch
from conftest import make_tokenizer
from torch.utils.data import DataLoader

from kdlora.config import DataArgs, KDArgs
from kdlora.data import Collator, Example, LengthGroupedBatchSampler, TokenizedDataset, load_splits, read_glue_tsv
from kdlora.errors import KdloraError
from kdlora.kinds import CLASSIFICATION, REGRESSION
from kdlora.losses import View, active_terms, objective
from kdlora.tasks import get_task

REAL_COUNTS = {"cola": (8551, 1043), "mrpc": (3668, 408), "stsb": (5749, 1500), "rte": (2490, 277), "wnli": (635, 71)}


@pytest.mark.parametrize("task", sorted(REAL_COUNTS))
def test_real_glue_row_counts(real_glue, task):
    splits = load_splits(DataArgs(task=task, data_dir=str(real_glue)), ["train", "validation"])
    assert (len(splits["train"]), len(splits["validation"])) == REAL_COUNTS[task]
    t = get_task(task)
    labels = {e.label for e in splits["train"]}
    if t.kind == "regression":
        assert all(isinstance(v, float) and 0 <= v <= 5 for v in labels)
    else:
        assert labels == set(range(t.num_labels))
    assert all(e.text_a for e in splits["train"]) and len({e.id for e in splits["train"]}) == REAL_COUNTS[task][0]


def test_real_mrpc_quotes_and_bom(real_glue):
    train = load_splits(DataArgs(task="mrpc", data_dir=str(real_glue)), ["train"])["train"]
    assert train[0].text_a.startswith("Amrozi accused his brother")
    assert '"' in train[0].text_a  # stray quotes stay part of the text, quoting is off
    test = read_glue_tsv(real_glue / "MRPC" / "test.tsv", get_task("mrpc"), "test")
    assert len(test) == 1725 and test[0].label is None


def test_fixture_quirks(tiny_glue):
    cola = load_splits(DataArgs(task="cola", data_dir=str(tiny_glue)), ["train", "validation", "test"])
    assert len(cola["train"]) == 96 and cola["train"][0].label in (0, 1) and cola["train"][0].text_b is None
    assert [e.id for e in cola["test"]] == list(range(10)) and cola["test"][0].label is None
    mrpc = load_splits(DataArgs(task="mrpc", data_dir=str(tiny_glue)), ["train"])["train"]
    assert mrpc[0].text_a.startswith('" ') and mrpc[0].text_b.startswith('the "')
    rte = load_splits(DataArgs(task="rte", data_dir=str(tiny_glue)), ["train"])["train"]
    assert {e.label for e in rte} == {0, 1}
    stsb = load_splits(DataArgs(task="stsb", data_dir=str(tiny_glue), max_train_samples=5), ["train"])["train"]
    assert len(stsb) == 5 and all(isinstance(e.label, float) for e in stsb)


def test_save_to_disk_source(tmp_path):
    import datasets

    rows = {"sentence": ["the cat .", "a dog ."], "label": [1, 0], "idx": [0, 1]}
    datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict(rows), "validation": datasets.Dataset.from_dict(rows)}
    ).save_to_disk(str(tmp_path / "cola"))
    splits = load_splits(DataArgs(task="cola", data_dir=str(tmp_path)), ["train", "validation"])
    assert splits["train"] == [Example(0, "the cat .", None, 1), Example(1, "a dog .", None, 0)]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("index\tsentence1\tlabel\n0\tthe cat\tentailment\n", "missing column"),
        ("index\tsentence1\tsentence2\tlabel\n0\tthe cat\tentailment\n", "ragged row"),
        ("index\tsentence1\tsentence2\tlabel\n0\ta\tb\tmaybe\n", "unknown label 'maybe'"),
    ],
)
def test_bad_tsv_gives_clear_error(tmp_path, content, message):
    (tmp_path / "RTE").mkdir()
    (tmp_path / "RTE" / "train.tsv").write_text(content)
    with pytest.raises(KdloraError, match=message):
        load_splits(DataArgs(task="rte", data_dir=str(tmp_path)), ["train"])


def test_missing_task_files_and_empty_cap(tiny_glue):
    with pytest.raises(KdloraError, match="has no wnli data"):
        load_splits(DataArgs(task="wnli", data_dir=str(tiny_glue)), ["train"])
    with pytest.raises(KdloraError, match="empty"):
        load_splits(DataArgs(task="cola", data_dir=str(tiny_glue), max_train_samples=0), ["train"])


def test_dynamic_padding_pads_to_longest_in_batch(tmp_path):
    tok = make_tokenizer(tmp_path)
    ds = TokenizedDataset([Example(0, "the cat", None, 1), Example(1, "the big red dog runs", None, 0)], tok, 128)
    batch = Collator(tok, CLASSIFICATION)([ds[0], ds[1]])
    assert batch.inputs["input_ids"].shape == (2, max(ds.lengths)) and max(ds.lengths) < 128
    assert set(batch.inputs) == {"input_ids", "token_type_ids", "attention_mask"}  # model inputs only
    assert batch.ids.tolist() == [0, 1] and batch.labels.tolist() == [1, 0] and batch.teacher_logits is None
    long = TokenizedDataset([Example(0, " ".join(["cat"] * 50), None, 1)], tok, max_length=16)
    assert long.lengths == [16]


@pytest.mark.parametrize("regression", [False, True])
def test_a_batch_of_only_transfer_rows_still_carries_masked_labels(tmp_path, regression):
    # Length grouping can put every transfer row of a run in one batch; the loss must see masked labels, not None.
    tok = make_tokenizer(tmp_path)
    teacher = torch.tensor([[0.3, -0.2], [1.0, 0.5]])[:, :1] if regression else torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    ds = TokenizedDataset([Example(0, "the cat", None, None), Example(1, "the dog", None, None)], tok, 16, teacher)
    batch = Collator(tok, REGRESSION if regression else CLASSIFICATION)([ds[0], ds[1]])
    assert batch.labels is not None and batch.labels.shape == (2,)
    logits = torch.zeros(2, teacher.shape[1], requires_grad=True)
    view = View(logits, batch.labels, batch.teacher_logits)
    parts = objective(active_terms(KDArgs(), True), view, KDArgs(), REGRESSION if regression else CLASSIFICATION)
    assert parts["task"].item() == 0 and parts["kd"].item() > 0
    parts["total"].backward()
    assert torch.isfinite(logits.grad).all()
    test = TokenizedDataset([Example(0, "the cat", None, None)], tok, 16)  # a test split: no labels, no teacher
    assert Collator(tok, REGRESSION if regression else CLASSIFICATION)([test[0]]).labels is None


def test_length_grouped_sampler_yields_every_example_once():
    lengths = [(i * 37) % 91 + 1 for i in range(1003)]
    sampler = LengthGroupedBatchSampler(lengths, batch_size=16, seed=3, mega=4)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        assert Counter(i for b in batches for i in b) == Counter(range(1003))
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert first != list(sampler)  # reshuffled each epoch
    sampler.set_epoch(0)
    assert first == list(sampler)  # and reproducible


def test_teacher_logits_stay_with_their_example_under_shuffling(tmp_path):
    """The seed paper's bug: one teacher row per batch position. Here each example must meet its own row."""
    from kdlora.teacher import TeacherLogits

    tok = make_tokenizer(tmp_path)
    examples = [Example(1000 + i, " ".join(["cat"] * (i % 7 + 1)), None, i % 2) for i in range(50)]
    ds = TokenizedDataset(examples, tok, 32)
    ids = torch.tensor([e.id for e in examples])
    perm = torch.randperm(50, generator=torch.Generator().manual_seed(0))  # the cache stores rows in another order
    cache = TeacherLogits(ids[perm], torch.stack([ids[perm].float(), -ids[perm].float()], dim=1))
    ds.teacher_logits = cache.rows_for(ds.ids)
    loader = DataLoader(
        ds, batch_sampler=LengthGroupedBatchSampler(ds.lengths, 8, seed=1), collate_fn=Collator(tok, CLASSIFICATION)
    )
    seen = 0
    for batch in loader:
        assert torch.equal(batch.teacher_logits[:, 0], batch.ids.float())
        seen += len(batch.ids)
    assert seen == 50
    with pytest.raises(KdloraError, match="missing"):
        cache.rows_for([5])


def test_regression_label_must_be_a_finite_number(tmp_path):
    header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore\n"
    (tmp_path / "STS-B").mkdir()
    for bad in ("nan", "high"):
        (tmp_path / "STS-B" / "train.tsv").write_text(header + f"0\tg\tf\ty\t0\tn\tn\ta cat\ta dog\t{bad}\n")
        with pytest.raises(KdloraError, match="not a finite number"):
            load_splits(DataArgs(task="stsb", data_dir=str(tmp_path)), ["train"])


def test_build_loaders_carry_teacher_logits_by_example_id(tmp_path):
    """The loop's own loaders: the train loader shuffles, every batch still meets its own teacher rows; the eval
    loaders cover each evaluation split once and carry no teacher targets."""
    from kdlora.data import build_loaders
    from kdlora.teacher import TeacherLogits

    tok, task = make_tokenizer(tmp_path), get_task("cola")
    examples = [Example(500 + i, " ".join(["dog"] * (i % 5 + 1)), None, i % 2) for i in range(40)]
    ids = torch.tensor([e.id for e in examples]).flip(0)  # the cache in another order
    cache = TeacherLogits(ids, torch.stack([ids.float(), -ids.float()], dim=1))
    loaders = build_loaders(
        {"train": examples, "validation": examples[:9]}, tok, task, 32, 8, 4, seed=3, teacher_rows=cache.rows_for
    )
    seen = []
    for batch in loaders.train:
        assert torch.equal(batch.teacher_logits[:, 0], batch.ids.float())
        assert "labels" not in batch.inputs and "idx" not in batch.inputs
        seen += batch.ids.tolist()
    assert sorted(seen) == sorted(e.id for e in examples) and seen != sorted(seen)
    assert set(loaders.eval) == {"validation"}
    evals = list(loaders.eval["validation"])
    assert sum(len(b.ids) for b in evals) == 9 and all(b.teacher_logits is None for b in evals)
