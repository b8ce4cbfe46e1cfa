"""End-to-end: the CLI trains tiny models with each method on GLUE-format fixtures and writes what it promises."""

import json
import subprocess
import sys

import pytest
import yaml
from conftest import train_argv

from kdlora.cli import main
from kdlora.errors import KdloraError


def _train(tmp, glue, *extra, task="cola"):
    args = train_argv(glue, tmp, "--task", task, "--epochs", "2", "--batch-size", "16", "--quiet", *extra)
    assert main(args) == 0
    return json.loads((tmp / "metrics.json").read_text())


@pytest.fixture(scope="module")
def fft_run(tmp_path_factory, tiny_bert_dir, tiny_glue):
    out = tmp_path_factory.mktemp("fft")
    return out, _train(out, tiny_glue, "--method", "fft", "--model", str(tiny_bert_dir), "--lr", "1e-3")


def _check_common(out, metrics, method):
    assert metrics["status"] == "finished" and metrics["method"] == method and metrics["task"] == "cola"
    assert 0 <= abs(metrics["score"]) <= 100 and "matthews_correlation" in metrics
    assert len(metrics["epochs"]) == 2 and metrics["best_epoch"] in (1, 2)
    assert len(metrics["train_loss"]) == 2 * 6  # 96 examples / batch 16, per epoch
    for key in ("trainable_params", "total_params", "train_seconds", "peak_memory_mb"):
        assert metrics[key] > 0
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["method"] == method and config["data"]["task"] == "cola"

    from transformers import pipeline

    clf = pipeline("text-classification", model=str(out / "merged"))
    assert clf("the cat likes the good dog .")[0]["label"] in ("unacceptable", "acceptable")


def test_fft(fft_run):
    out, metrics = fft_run
    _check_common(out, metrics, "fft")
    assert metrics["trainable_params"] == metrics["total_params"] and "lora_target_modules" not in metrics
    assert not (out / "adapter").exists()


def test_lora(tmp_path, tiny_bert_dir, tiny_glue):
    metrics = _train(tmp_path, tiny_glue, "--method", "lora", "--model", str(tiny_bert_dir), "--rank", "4")
    _check_common(tmp_path, metrics, "lora")
    # every linear layer but the head: 4 layers x r 4 x (q, k, v, attention output: 32+32; intermediate, output: 32+37)
    assert metrics["lora_params"] == 4 * 4 * (4 * 64 + 2 * 69)
    assert metrics["lora_target_modules"] == ["intermediate.dense", "key", "output.dense", "query", "value"]
    assert metrics["trainable_params"] < metrics["total_params"]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    adapter_config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert set(adapter_config["modules_to_save"]) >= {"classifier", "pooler"}


def test_kd_lora_with_teacher_model_and_student_layers(tmp_path, tiny_bert_dir, tiny_glue):
    args = ["--method", "kd-lora", "--teacher-model", str(tiny_bert_dir), "--student-layers", "0,2"]
    args += ["--teacher-lr", "1e-3", "--teacher-epochs", "1"]
    metrics = _train(tmp_path, tiny_glue, *args)
    _check_common(tmp_path, metrics, "kd-lora")
    assert (tmp_path / "teacher" / "metrics.json").is_file() and metrics["teacher_score"] is not None
    assert metrics["total_params"] < metrics["teacher_total_params"]
    assert len(metrics["train_loss_kd"]) == len(metrics["train_loss"]) and metrics["teacher_logits_cached"] is False
    merged = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert merged["num_hidden_layers"] == 2
    # The same command again reuses the finished teacher and its cached logits.
    again = _train(tmp_path, tiny_glue, *args, "--overwrite")
    assert again["teacher_logits_cached"] is True and again["score"] == metrics["score"]


def test_kd_lora_reuses_fft_teacher_dir_and_its_logits(tmp_path, fft_run, tiny_bert_dir, tiny_glue):
    teacher, _ = fft_run
    first = _train(
        tmp_path / "a", tiny_glue, "--method", "kd-lora", "--teacher", str(teacher), "--model", str(tiny_bert_dir)
    )
    second = _train(
        tmp_path / "b", tiny_glue, "--method", "kd-lora", "--teacher", str(teacher), "--student-layers", "1,3"
    )
    assert (first["teacher_logits_cached"], second["teacher_logits_cached"]) == (False, True)
    assert len(list((teacher / "logits").glob("*.safetensors"))) == 1


def test_regression_kd_lora(tmp_path, tiny_bert_dir, tiny_glue):
    teacher = tmp_path / "t"
    _train(teacher, tiny_glue, "--method", "fft", "--model", str(tiny_bert_dir), task="stsb")
    metrics = _train(
        tmp_path / "s",
        tiny_glue,
        "--method",
        "kd-lora",
        "--teacher",
        str(teacher),
        "--student-layers",
        "0,1",
        task="stsb",
    )
    assert {"pearson", "spearman", "score"} <= set(metrics) and metrics["task"] == "stsb"


def test_same_seed_same_run(tmp_path, tiny_bert_dir, tiny_glue):
    a = _train(tmp_path / "a", tiny_glue, "--method", "lora", "--model", str(tiny_bert_dir), "--seed", "7")
    b = _train(tmp_path / "b", tiny_glue, "--method", "lora", "--model", str(tiny_bert_dir), "--seed", "7")
    c = _train(tmp_path / "c", tiny_glue, "--method", "lora", "--model", str(tiny_bert_dir), "--seed", "8")
    assert a["train_loss"] == b["train_loss"] and a["epochs"] == b["epochs"]
    assert a["train_loss"] != c["train_loss"]


def test_evaluate_and_predict(tmp_path, fft_run, tiny_glue, capsys):
    run_dir, metrics = fft_run
    common = ["--model-dir", str(run_dir), "--task", "cola", "--data-dir", str(tiny_glue)]
    assert main(["evaluate", *common, "--output", str(tmp_path / "eval.json")]) == 0
    rescored = json.loads((tmp_path / "eval.json").read_text())
    assert rescored["score"] == pytest.approx(metrics["score"], abs=1e-6)
    assert main(["predict", *common, "--output-dir", str(tmp_path / "sub")]) == 0
    lines = (tmp_path / "sub" / "CoLA.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 11
    assert all(line.split("\t")[1] in ("0", "1") for line in lines[1:])


def test_finished_run_is_not_overwritten_silently(fft_run, tiny_bert_dir, tiny_glue, capsys):
    out, _ = fft_run
    code = main(
        [
            "train",
            "--method",
            "fft",
            "--task",
            "cola",
            "--model",
            str(tiny_bert_dir),
            "--data-dir",
            str(tiny_glue),
            "--output-dir",
            str(out),
        ]
    )
    assert code == 2 and "already holds a finished run" in capsys.readouterr().err


def test_errors_are_one_line_with_exit_2(tmp_path, tiny_glue):
    argv = train_argv(tiny_glue, tmp_path / "out", "--model", str(tmp_path / "nope"))
    proc = subprocess.run([sys.executable, "-m", "kdlora", *argv], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"kdlora: error: model path {tmp_path / 'nope'} does not exist"]


def test_bf16_autocast_and_grad_accumulation_run_on_cpu(tmp_path, tiny_bert_dir, tiny_glue):
    metrics = _train(
        tmp_path,
        tiny_glue,
        "--method",
        "lora",
        "--model",
        str(tiny_bert_dir),
        "--mixed-precision",
        "bf16",
        "--grad-accum-steps",
        "2",
    )
    assert len(metrics["train_loss"]) == 2 * 3  # 6 micro-batches per epoch, 2 per optimizer step
    assert all(isinstance(x, float) for x in metrics["train_loss"])


def test_teacher_cache_is_checked_not_trusted(fft_run, tiny_glue):
    import torch

    from kdlora.config import DataArgs
    from kdlora.data import load_splits
    from kdlora.tasks import get_task
    from kdlora.teacher import teacher_logits

    run_dir, _ = fft_run
    task = get_task("cola")
    train = load_splits(DataArgs(task="cola", data_dir=str(tiny_glue)), ["train"])["train"]
    first, _ = teacher_logits(run_dir, train, task, 128, quiet=True)
    again, cached = teacher_logits(run_dir, train, task, 128, quiet=True)
    assert cached and torch.equal(again.logits, first.logits)
    for path in (run_dir / "logits").glob("*.safetensors"):  # a truncated cache file is recomputed, not read
        path.write_bytes(path.read_bytes()[:100])
    fresh, cached = teacher_logits(run_dir, train, task, 128, quiet=True)
    assert not cached and torch.equal(fresh.ids, first.ids)
    torch.testing.assert_close(fresh.logits, first.logits)
    subset, cached = teacher_logits(run_dir, train[:40], task, 128, quiet=True)  # other data: another fingerprint
    assert not cached and len(subset.ids) == 40
    torch.testing.assert_close(subset.logits, first.logits[:40], atol=1e-5, rtol=0)
    with pytest.raises(KdloraError, match="no valid cached teacher logits"):  # --no-recompute: fail, don't recompute
        teacher_logits(run_dir, train[:30], task, 128, quiet=True, recompute=False)
    assert teacher_logits(run_dir, train[:40], task, 128, quiet=True, recompute=False)[1] is True


def test_evaluate_refuses_an_unfinished_run(tmp_path, tiny_glue, capsys):
    (tmp_path / "config.yaml").write_text("train: {method: lora}\n")
    assert main(["evaluate", "--model-dir", str(tmp_path), "--task", "cola", "--data-dir", str(tiny_glue)]) == 2
    assert "unfinished run" in capsys.readouterr().err


def test_kd_fft_distils_into_every_parameter_of_the_student(tmp_path, fft_run, tiny_glue):
    """kd-fft: the student fully fine-tuned with the same KD loss, which tells what distillation gives apart from
    what LoRA costs."""
    teacher, _ = fft_run
    metrics = _train(tmp_path, tiny_glue, "--method", "kd-fft", "--teacher", str(teacher), "--student-layers", "0,2")
    _check_common(tmp_path, metrics, "kd-fft")
    assert metrics["trainable_params"] == metrics["total_params"] and metrics["lora_params"] == 0
    assert len(metrics["train_loss_kd"]) == len(metrics["train_loss"])
    assert not (tmp_path / "adapter").exists() and "kd-fft" in (tmp_path / "merged" / "README.md").read_text()
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["train"]["lr"] == 2e-3  # train_argv's


def test_kd_lora_with_a_transfer_set(tmp_path, fft_run, tiny_glue):
    """--augment: teacher-labelled variants of each training sentence join the training set, distilled only; their
    logits are cached with the training set's, so the same command finds them."""
    from kdlora.config import DataArgs
    from kdlora.data import load_splits, load_task
    from kdlora.teacher import transfer_set

    teacher, _ = fft_run
    args = ["--method", "kd-lora", "--teacher", str(teacher), "--student-layers", "0,2", "--augment", "2"]
    metrics = _train(tmp_path, tiny_glue, *args)
    assert metrics["num_train_examples"] == 96 and metrics["num_transfer_examples"] == 192
    assert len(metrics["train_loss"]) == 2 * 18  # (96 + 192) / 16 batches per epoch
    again = _train(tmp_path, tiny_glue, *args, "--overwrite")
    assert again["teacher_logits_cached"] is True and again["score"] == metrics["score"]

    data = DataArgs(task="cola", data_dir=str(tiny_glue))
    train = load_splits(data, ["train"])["train"]
    made = transfer_set(teacher, train, load_task(data), 2, 0.5, 3, seed=1)
    assert made == transfer_set(teacher, train, load_task(data), 2, 0.5, 3, seed=1)  # deterministic
    assert [e.id for e in made] == list(range(96, 96 + 192)) and all(e.label is None for e in made)
    assert sum(a.text_a != b.text_a for a, b in zip(train * 2, made, strict=True)) > 96  # most are changed


def test_transfer_set_from_a_masked_lm(tmp_path, fft_run, tiny_bert_dir, tiny_glue, capsys):
    """--augment-mlm: the swapped pieces are a masked LM's top predictions at the masked positions (TinyBERT's
    augmentation); deterministic and independent of batching; a checkpoint without a masked-LM head fails in one line
    before training."""
    import torch
    from conftest import make_tokenizer, tiny_bert_config
    from transformers import BertForMaskedLM

    from kdlora.config import DataArgs
    from kdlora.data import load_splits, load_task
    from kdlora.teacher import MaskedLMSwap, _draws, transfer_set

    teacher, _ = fft_run
    mlm = tmp_path / "mlm"
    torch.manual_seed(0)
    BertForMaskedLM(tiny_bert_config()).save_pretrained(mlm)
    make_tokenizer(mlm).save_pretrained(mlm)
    args = ["--method", "kd-lora", "--teacher", str(teacher), "--student-layers", "0,2", "--augment", "1"]
    metrics = _train(tmp_path / "run", tiny_glue, *args, "--augment-mlm", str(mlm))
    assert metrics["num_transfer_examples"] == 96
    assert f"pieces proposed by the masked LM {mlm}" in (tmp_path / "run" / "merged" / "README.md").read_text()

    data = DataArgs(task="cola", data_dir=str(tiny_glue))
    train, task = load_splits(data, ["train"])["train"], load_task(data)
    made = transfer_set(teacher, train, task, 2, 0.5, 3, seed=1, mlm=str(mlm))
    assert made == transfer_set(teacher, train, task, 2, 0.5, 3, seed=1, mlm=str(mlm))
    assert made != transfer_set(teacher, train, task, 2, 0.5, 3, seed=1)  # not the embedding neighbours
    assert sum(a.text_a != b.text_a for a, b in zip(train * 2, made, strict=True)) > 96

    # Each swapped piece is among the masked LM's top 3 at its position, with every chosen piece masked; batching
    # does not change the result.
    swap = MaskedLMSwap(str(mlm), 3, batch_size=1)
    g = torch.Generator().manual_seed(0)
    texts = [(ids, *_draws(ids, 0.5, g)) for ids in (swap.tokenizer(e.text_a, add_special_tokens=False)["input_ids"]
                                                       for e in train[:8])]  # fmt: skip
    one = swap(texts)
    assert one == MaskedLMSwap(str(mlm), 3, batch_size=16)(texts)
    ids, chosen, _ = texts[0]
    masked = [swap.tokenizer.mask_token_id if c else i for i, c in zip(ids, chosen, strict=True)]
    with torch.no_grad():
        tok = swap.tokenizer
        logits = swap.model(torch.tensor([[tok.cls_token_id, *masked, tok.sep_token_id]])).logits[0]
    for j, (old, new) in enumerate(zip(ids, one[0], strict=True)):
        if chosen[j]:
            scores = logits[1 + j].clone()
            scores[[old, *swap.special]] = float("-inf")
            assert new in scores.topk(3).indices.tolist()
        else:
            assert new == old

    for extra, message in (
        (["--augment-mlm", str(tiny_bert_dir)], "has no masked-LM head"),
        (["--augment", "0", "--augment-mlm", str(mlm)], "give N"),
    ):
        out = tmp_path / "bad"
        assert main(train_argv(tiny_glue, out, "--quiet", *args, *extra)) == 2
        assert message in capsys.readouterr().err and not out.exists()


def test_kd_lora_with_unlabelled_text(tmp_path, fft_run, tiny_glue, capsys):
    """--unlabeled-file: the user's unlabelled rows join the training set with the teacher's logits as their only
    target; a file that does not fit the task fails before training, in one line."""
    teacher, _ = fft_run
    texts = ["the dog likes the cat .", "a big red cat runs .", "the good dog ."] * 10
    (tmp_path / "extra.txt").write_text("\n".join(texts) + "\n")
    args = ["--method", "kd-lora", "--teacher", str(teacher), "--student-layers", "0,2"]
    metrics = _train(tmp_path / "run", tiny_glue, *args, "--unlabeled-file", str(tmp_path / "extra.txt"))
    assert metrics["num_train_examples"] == 96 and metrics["num_transfer_examples"] == 30
    assert len(metrics["train_loss"]) == 2 * 8  # (96 + 30) / 16 batches per epoch
    assert "a transfer set of 30 teacher-labelled rows from" in (tmp_path / "run" / "merged" / "README.md").read_text()

    (tmp_path / "pairs.csv").write_text("sentence1,sentence2\nthe dog,the cat\n")
    (tmp_path / "blank.txt").write_text("the dog\n\nthe cat\n")
    for bad, message in (("pairs.csv", "takes one text per example"), ("blank.txt", "line 2 is empty")):
        out = tmp_path / bad.replace(".", "-")
        argv = train_argv(tiny_glue, out, "--task", "cola", "--quiet", *args, "--unlabeled-file", str(tmp_path / bad))
        assert main(argv) == 2
        assert message in capsys.readouterr().err and not out.exists()
    fft = train_argv(tiny_glue, tmp_path / "f", "--method", "fft", "--model", "m", "--unlabeled-file", "x.txt")
    assert main(fft) == 2 and "fft has none" in capsys.readouterr().err


def test_kd_lora_with_hidden_state_distillation(tmp_path, fft_run, tiny_bert_dir, tiny_glue, capsys):
    """--hidden-weight: each student layer's output is matched to its teacher layer's (uniform map by default), the
    term is logged apart, and only LoRA and the head train. A map or student that cannot work fails before training."""
    from conftest import make_tokenizer, tiny_bert_config
    from safetensors.torch import load_file
    from transformers import BertModel, BertTokenizerFast

    teacher, _ = fft_run
    args = ["--method", "kd-lora", "--teacher", str(teacher), "--student-layers", "0,2"]
    metrics = _train(tmp_path / "run", tiny_glue, *args, "--hidden-weight", "1", "--hidden-loss", "cosine")
    assert metrics["status"] == "finished" and metrics["hidden_layers"] == [2, 4]  # 2 of 4 layers: 2 and 4
    hidden = metrics["train_loss_hidden"]
    assert len(hidden) == len(metrics["train_loss"]) == 2 * 6 and all(h > 0 for h in hidden)
    parts = zip(metrics["train_loss"], metrics["train_loss_task"], metrics["train_loss_kd"], hidden, strict=True)
    assert all(abs(t - (0.5 * a + 0.5 * k + h)) < 1e-4 for t, a, k, h in parts)
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k or "classifier" in k or "pooler" in k for k in adapter)
    assert "teacher's layers 2,4 (cosine, weight 1.0)" in (tmp_path / "run" / "merged" / "README.md").read_text()
    plain = _train(tmp_path / "plain", tiny_glue, *args)
    assert "train_loss_hidden" not in plain and "hidden_layers" not in plain

    # A narrower student of the same vocabulary: a learned projection per layer pair bridges the widths, trains
    # with the student, and is never saved with it.
    narrow = tmp_path / "narrow"
    BertModel(tiny_bert_config(hidden_size=16, intermediate_size=32)).save_pretrained(narrow)
    make_tokenizer(narrow).save_pretrained(narrow)
    student = ["--method", "kd-lora", "--teacher", str(teacher), "--model", str(narrow), "--hidden-weight", "0.5"]
    bridged = _train(tmp_path / "narrow-run", tiny_glue, *student)
    assert bridged["hidden_layers"] == [1, 2, 3, 4] and bridged["hidden_projection_params"] == 4 * (16 * 32 + 32)
    merged = load_file(tmp_path / "narrow-run" / "merged" / "model.safetensors")
    assert not any("projection" in k for k in merged) and merged["classifier.weight"].shape == (2, 16)

    other = tmp_path / "other-vocab"  # another vocabulary: its tokens are not the teacher's
    BertModel(tiny_bert_config(hidden_size=16, intermediate_size=32)).save_pretrained(other)
    (other / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "x", "y"]) + "\n")
    BertTokenizerFast.from_pretrained(str(other)).save_pretrained(other)
    for extra, message in (
        (args + ["--hidden-layers", "1,2,3"], "give 2 teacher layers"),
        (args + ["--hidden-layers", "2,9"], "each from 1 to 4"),
        (["--method", "kd-lora", "--teacher", str(teacher), "--model", str(other)], "needs the teacher's vocabulary"),
    ):
        out = tmp_path / "bad"
        assert main(train_argv(tiny_glue, out, "--quiet", *extra, "--hidden-weight", "0.5")) == 2
        assert message in capsys.readouterr().err and not out.exists()


def test_kd_lora_with_attention_relation_distillation(tmp_path, fft_run, tiny_glue, capsys):
    """--attention-weight: the student's last layer learns the query/key/value relations of a teacher layer (MiniLMv2),
    logged apart, with or without the hidden-state term (and the same with gradient checkpointing); a narrower
    student needs no projection; a layer or head count that cannot work fails before training, in one line."""
    from conftest import make_tokenizer, tiny_bert_config
    from safetensors.torch import load_file
    from transformers import BertModel

    teacher, _ = fft_run
    args = ["--method", "kd-lora", "--teacher", str(teacher), "--student-layers", "0,2"]
    metrics = _train(tmp_path / "run", tiny_glue, *args, "--attention-weight", "2")
    assert metrics["attention_layer"] == 4 and metrics["attention_heads"] == 2  # the teacher's last layer and heads
    relation = metrics["train_loss_attention"]
    assert len(relation) == len(metrics["train_loss"]) and all(r > 0 for r in relation)
    parts = zip(metrics["train_loss"], metrics["train_loss_task"], metrics["train_loss_kd"], relation, strict=True)
    assert all(abs(t - (0.5 * a + 0.5 * k + 2 * r)) < 1e-4 for t, a, k, r in parts)
    assert "train_loss_hidden" not in metrics
    adapter = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert adapter and all("lora_" in k or "classifier" in k or "pooler" in k for k in adapter)
    card = (tmp_path / "run" / "merged" / "README.md").read_text()
    assert "self-attention relations matched to the teacher's layer 4 (2 relation heads, weight 2.0)" in card

    both = _train(tmp_path / "both", tiny_glue, *args, "--attention-weight", "1", "--attention-layer", "2",
                  "--hidden-weight", "1")  # fmt: skip
    assert both["attention_layer"] == 2 and both["hidden_layers"] == [2, 4]
    assert len(both["train_loss_attention"]) == len(both["train_loss_hidden"]) == len(both["train_loss"])
    # recomputing each layer in the backward pass (hooks fire twice, dropout redrawn alike) trains the same run
    recomputed = _train(tmp_path / "recomputed", tiny_glue, *args, "--attention-weight", "1", "--attention-layer", "2",
                        "--hidden-weight", "1", "--gradient-checkpointing")  # fmt: skip
    for key in ("train_loss", "train_loss_attention", "train_loss_hidden"):
        assert recomputed[key] == pytest.approx(both[key], rel=1e-4, abs=1e-6), key

    narrow = tmp_path / "narrow"  # width 16, 2 heads: relations are S x S, so no projection is needed
    BertModel(tiny_bert_config(hidden_size=16, intermediate_size=32, num_hidden_layers=2)).save_pretrained(narrow)
    make_tokenizer(narrow).save_pretrained(narrow)
    student = ["--method", "kd-lora", "--teacher", str(teacher), "--model", str(narrow), "--attention-weight", "1"]
    bridged = _train(tmp_path / "narrow-run", tiny_glue, *student)
    assert bridged["attention_heads"] == 2 and "hidden_projection_params" not in bridged

    for extra, message in (
        (["--attention-layer", "9"], "the teacher has layers 1 to 4"),
        (["--attention-heads", "3"], "--attention-heads 3 must divide every query, key and value width"),
    ):
        out = tmp_path / "bad"
        assert main(train_argv(tiny_glue, out, "--quiet", *args, "--attention-weight", "1", *extra)) == 2
        assert message in capsys.readouterr().err and not out.exists()
    lora = train_argv(tiny_glue, tmp_path / "l", "--model", "m", "--attention-weight", "1")
    assert main(lora) == 2 and "lora has none" in capsys.readouterr().err


def test_pissa_initialisation_trains_end_to_end(tmp_path, tiny_bert_dir, tiny_glue):
    """PiSSA reads the weights at initialisation: the pre-flight, on the meta device, must not try to."""
    metrics = _train(tmp_path, tiny_glue, "--method", "lora", "--model", str(tiny_bert_dir), "--init-lora-weights",
                     "pissa", "--use-dora")  # fmt: skip
    assert metrics["status"] == "finished" and metrics["lora_params"] > 0
