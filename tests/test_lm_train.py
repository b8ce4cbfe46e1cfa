"""Generative KD-LoRA end to end on tiny in-process Llama models and a tokenizer built in-process: the teacher
fine-tuned, a student cut from its decoder layers and distilled with LoRA from the teacher's cached top-k, its
outputs (metrics, completions, a merged model that pipeline("text-generation") answers from); the loss of one
optimizer step independent of how its rows fall into micro-batches; a killed run resumed; one-line refusals."""

import json
import random

import pytest
import torch
import yaml
from test_lm_data import WORDS, tokenizer

from kdlora.cli import main

QUESTIONS = ["is the cat good ?", "the cat is good ?", "is the cat ?", "the cat ?", "is good ?", "good cat ?"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    """A 4-layer Llama with the word-level tokenizer (16 output rows for 13 tokens: padding rows to cut), and
    prompt/completion data whose answer is 'yes' when the prompt says 'good'."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lm")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "teacher-base")
    tokenizer().save_pretrained(root / "teacher-base")
    rng = random.Random(0)
    rows = [{"prompt": q, "completion": "yes" if "good" in q else "no"} for q in QUESTIONS for _ in range(6)]
    rng.shuffle(rows)
    return {
        "root": root,
        "model": root / "teacher-base",
        "train": write_jsonl(root / "train.jsonl", rows[:28]),
        "dev": write_jsonl(root / "dev.jsonl", rows[28:]),
    }


def lm_args(setup, out, *extra):
    return ["train", "--train-file", str(setup["train"]), "--validation-file", str(setup["dev"]),
            "--prompt-column", "prompt", "--completion-column", "completion", "--output-dir", str(out),
            "--batch-size", "4", "--eval-batch-size", "8", "--quiet", "--seed", "1", *extra]  # fmt: skip


def test_kd_lora_distils_a_causal_lm_into_a_student_cut_from_its_layers(lm_setup, tmp_path, capsys):
    from transformers import pipeline

    out = tmp_path / "kd"
    main(lm_args(lm_setup, out, "--method", "kd-lora", "--teacher-model", str(lm_setup["model"]),
                 "--teacher-lr", "3e-3", "--teacher-epochs", "3", "--student-layers", "0,2", "--lr", "3e-3",
                 "--epochs", "2", "--teacher-top-k", "4", "--generate-rows", "4"))  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["kind"] == "generation" and m["status"] == "finished" and m["lr"] == 3e-3
    for key in ("nll", "perplexity", "kl", "agreement", "exact_match"):
        assert key in m and m[key] == m["epochs"][m["best_epoch"] - 1][key]
    assert m["vocabulary"] == len(WORDS)  # the 3 padding rows cut
    assert m["score"] == -m["nll"] and len(m["train_loss"]) == 2 * 7 and len(m["train_loss_kd"]) == 14
    assert m["teacher_top_k"] == 4 and 0 < m["teacher_cache_bytes_per_token"] < 200
    assert m["num_train_tokens"] == 28 * 2  # the answer and its end of text, per row
    assert m["train_tokens_per_second"] > 0 and m["generate_tokens_per_second"] > 0
    teacher = json.loads((out / "teacher" / "metrics.json").read_text())
    assert teacher["method"] == "fft" and teacher["kind"] == "generation" and "kl" not in teacher
    generations = [json.loads(line) for line in (out / "generations.jsonl").read_text().splitlines()]
    assert len(generations) == 4 and all(g["reference"] in ("yes", "no") for g in generations)
    merged = json.loads((out / "merged" / "config.json").read_text())
    assert merged["num_hidden_layers"] == 2 and (out / "adapter" / "adapter_config.json").is_file()
    generate = pipeline("text-generation", model=str(out / "merged"), device="cpu")
    answer = generate("is the cat good ?", max_new_tokens=2, do_sample=False)[0]["generated_text"]
    assert answer.startswith("is the cat good ?") and len(answer) > len("is the cat good ?")
    # kdlora predict completes a raw file's prompts with the run's merged student, as pipeline() does.
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("is the cat good ?\nthe cat ?\n")
    assert main(["predict", "--model-dir", str(out), "--input-file", str(prompts), "--output-file",
                 str(tmp_path / "completions.jsonl"), "--max-new-tokens", "2"]) == 0  # fmt: skip
    done = [json.loads(line) for line in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [d["id"] for d in done] == ["0", "1"]
    assert done[0]["generated"] == answer[len("is the cat good ?") :].strip()
    # export: the merged student as ONNX logits, checked on the run's validation rows, and as safetensors.
    assert main(["export", "--model-dir", str(out), "--output-dir", str(tmp_path / "onnx")]) == 0
    record = json.loads((tmp_path / "onnx" / "export.json").read_text())
    assert record["parity_data"] == "validation" and record["parity_examples"] == 8
    assert record["max_abs_logit_diff"] < 1e-3 and record["top1_agreement"] == 100.0
    assert record["exported_nll"] == pytest.approx(record["pytorch_nll"], abs=1e-4)
    assert (tmp_path / "onnx" / "tokenizer.json").is_file() and (tmp_path / "onnx" / "config.json").is_file()
    assert main(["export", "--model-dir", str(out), "--output-dir", str(tmp_path / "st"), "--format",
                 "safetensors"]) == 0  # fmt: skip
    copied = json.loads((tmp_path / "st" / "export.json").read_text())
    assert list(copied["sha256"]) == ["model.safetensors"] and (tmp_path / "st" / "README.md").is_file()
    again = pipeline("text-generation", model=str(tmp_path / "st"), device="cpu")
    assert again("is the cat good ?", max_new_tokens=2, do_sample=False)[0]["generated_text"] == answer
    # Commands that read a classifier say, in one line, that this is not one (rather than load it with a new head).
    assert main(["evaluate", "--model-dir", str(out)]) == 2
    assert "is a causal language model, not a classifier" in capsys.readouterr().err
    # A second student of the same teacher and data reads the teacher's cache, computing nothing.
    again = tmp_path / "kd2"
    main(lm_args(lm_setup, again, "--method", "kd-lora", "--teacher", str(out / "teacher"), "--student-layers",
                 "1,3", "--lr", "3e-3", "--epochs", "1", "--teacher-top-k", "4", "--generate-rows", "0",
                 "--no-recompute"))  # fmt: skip
    m2 = json.loads((again / "metrics.json").read_text())
    assert m2["teacher_rows_computed"] == 0 and m2["teacher_cache"] == m["teacher_cache"]
    assert "exact_match" not in m2 and not (again / "generations.jsonl").exists()
    # report gives language models their own table: the three runs, their per-token figures and the loss curves.
    assert main(["report", str(tmp_path), "--quiet"]) == 0
    table = (tmp_path / "generative.md").read_text()
    assert "| kd/teacher | fft |" in table and "| kd | kd-lora | 0.5 |" in table and "| kd2 | kd-lora |" in table
    assert (tmp_path / "generative.png").stat().st_size > 0


def test_a_qwen2_student_cut_from_its_layers_trains_on_chat_messages(lm_setup, tmp_path):
    """Another decoder family (Qwen2: biases on q, k, v) and the chat path, teacher used as it is."""
    from test_lm_data import TEMPLATE
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=16, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)  # fmt: skip
    Qwen2ForCausalLM(config).save_pretrained(tmp_path / "qwen")
    tok = tokenizer()
    tok.chat_template = TEMPLATE
    tok.save_pretrained(tmp_path / "qwen")
    chat = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["completion"]}]}
            for r in map(json.loads, lm_setup["train"].read_text().splitlines())]  # fmt: skip
    write_jsonl(tmp_path / "chat.jsonl", chat)
    out = tmp_path / "run"
    main(["train", "--method", "kd-lora", "--train-file", str(tmp_path / "chat.jsonl"), "--validation-file",
          str(tmp_path / "chat.jsonl"), "--messages-column", "messages", "--teacher-model", str(tmp_path / "qwen"),
          "--teacher-method", "none", "--student-layers", "0,2", "--lr", "3e-3", "--epochs", "1", "--quiet",
          "--generate-rows", "2", "--output-dir", str(out)])  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["teacher"] == str(tmp_path / "qwen") and not (out / "teacher" / "metrics.json").exists()
    # transformers maps a qwen2 model to its own tokenizer class, which splits the word-level vocabulary otherwise:
    # at least each answer's end of text is learnt.
    assert m["num_train_tokens"] >= 28 and m["kl"] >= 0 and "exact_match" in m
    assert json.loads((out / "merged" / "config.json").read_text())["model_type"] == "qwen2"


def test_lora_on_plain_text_picks_its_own_lr(lm_setup, tmp_path):
    """--text-column (every token learnt) and the default --lr auto: the range test runs on the LM's own step."""
    texts = [
        {"text": f"{r['prompt']} {r['completion']}"}
        for r in map(json.loads, lm_setup["train"].read_text().splitlines())
    ]
    write_jsonl(tmp_path / "text.jsonl", texts)
    out = tmp_path / "run"
    main(["train", "--method", "lora", "--model", str(lm_setup["model"]), "--train-file", str(tmp_path / "text.jsonl"),
          "--validation-file", str(tmp_path / "text.jsonl"), "--text-column", "text", "--epochs", "1", "--quiet",
          "--output-dir", str(out)])  # fmt: skip
    m = json.loads((out / "metrics.json").read_text())
    assert m["lr_chosen_by"] == "auto" and (out / "lr.json").is_file() and (out / "lr_find.png").is_file()
    assert "exact_match" not in m and not (out / "generations.jsonl").exists()  # a text has no answer to match
    tok = tokenizer()
    assert m["num_train_tokens"] == sum(len(tok(t["text"])["input_ids"]) - 1 for t in texts)  # all but the first


def _step_weights(lm_setup, window_rows, accum):
    """The LoRA weights after one LMStep (plain SGD, lr 1) on the rows, in micro-batches of len // accum."""
    from transformers import AutoModelForCausalLM

    from kdlora.config import KDArgs, LoraArgs, TrainArgs
    from kdlora.lm import HiddenStates, LMStep, WindowCollator, encode_rows
    from kdlora.lm_data import LMRow
    from kdlora.loop import build_accelerator
    from kdlora.models import add_lm_lora

    torch.manual_seed(0)
    tok = tokenizer()
    lm = add_lm_lora(AutoModelForCausalLM.from_pretrained(lm_setup["model"]), LoraArgs(lora_dropout=0.0))
    with torch.no_grad():
        for n, p in lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)  # B = 0 at init would give A no gradient
    model = HiddenStates(lm, len(WORDS))
    encoded = encode_rows([LMRow(i, prompt=r["prompt"], completion=r["completion"]) for i, r in enumerate(window_rows)],
                          tok, 32)  # fmt: skip
    window = WindowCollator(len(encoded) // accum, tok.pad_token_id)([(e, None) for e in encoded])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    step = LMStep(model, optimizer, scheduler, build_accelerator(TrainArgs()), KDArgs(), 0.0, distilled=False)
    loss = step(window)
    return loss, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_one_step_is_the_same_however_its_rows_fall_into_micro_batches(lm_setup):
    rows = [{"prompt": "is the cat good ?", "completion": "yes"}, {"prompt": "the cat ?", "completion": "no no"},
            {"prompt": "good cat ?", "completion": "yes"}, {"prompt": "is the cat ?", "completion": "no"}]  # fmt: skip
    loss1, one = _step_weights(lm_setup, rows, 1)
    loss2, two = _step_weights(lm_setup, rows, 2)  # 5 learnt tokens in the first micro-batch, 4 in the second
    torch.testing.assert_close(loss1, loss2)
    for n in one:
        torch.testing.assert_close(one[n], two[n], rtol=1e-5, atol=1e-6)


def test_a_killed_run_resumes_to_the_same_weights(lm_setup, tmp_path, monkeypatch, capsys):
    from kdlora import lm

    args = ["--method", "lora", "--model", str(lm_setup["model"]), "--lr", "3e-3", "--epochs", "2",
            "--save-steps", "3", "--generate-rows", "0"]  # fmt: skip
    main(lm_args(lm_setup, tmp_path / "whole", *args))
    calls = {"n": 0}
    real = lm.LMStep.__call__

    def dies(self, window):
        calls["n"] += 1
        if calls["n"] == 10:
            raise KeyboardInterrupt  # killed after the checkpoint at step 9
        return real(self, window)

    monkeypatch.setattr(lm.LMStep, "__call__", dies)
    assert main(lm_args(lm_setup, tmp_path / "killed", *args)) != 0
    monkeypatch.setattr(lm.LMStep, "__call__", real)
    assert main(lm_args(lm_setup, tmp_path / "killed", *args)) == 0
    assert f"resuming {tmp_path / 'killed'} at epoch 2" in capsys.readouterr().out
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    resumed = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)
    assert resumed["nll"] == pytest.approx(whole["nll"], rel=1e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-column", "question"], "question"),
        (["--student-layers", "0,7"], "out of range"),
        (["--text-column", "prompt"], "one form"),
        (["--hidden-weight", "1"], "distil a classifier"),
    ],
)
def test_bad_settings_fail_in_one_line_before_training(lm_setup, tmp_path, capsys, extra, message):
    args = lm_args(lm_setup, tmp_path / "bad", "--method", "kd-lora", "--teacher-model", str(lm_setup["model"]),
                   *(["--student-layers", "0,2"] if "--student-layers" not in extra else []), *extra)  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert not (tmp_path / "bad" / "teacher" / "metrics.json").exists()


def test_compare_runs_a_language_models_four_arms_and_reports_them(lm_setup, tmp_path, capsys):
    """fft teacher, LoRA on its model, the student alone (α = 1) and KD-LoRA, cut from the teacher's layers and
    distilled from its cache, filled by compare itself; the report's per-arm table; --label-budget refused."""
    (tmp_path / "lm.yaml").write_text(
        "common:\n  train: {epochs: 2, batch_size: 4, eval_batch_size: 8, lr: 3.0e-3, generate_rows: 4}\n"
        "  kd: {teacher_top_k: 4}\nfft:\n  train: {epochs: 3}\n"
    )
    args = ["compare", "--train-file", str(lm_setup["train"]), "--validation-file", str(lm_setup["dev"]),
            "--prompt-column", "prompt", "--completion-column", "completion", "--config", str(tmp_path / "lm.yaml"),
            "--tasks", "yesno", "--teacher-model", str(lm_setup["model"]), "--student-layers", "0,2",
            "--output-dir", str(tmp_path / "o"), "--seeds", "1", "--quiet"]  # fmt: skip
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "student: teacher top-k computed and cached" in out and "kd-lora: teacher top-k found in the cache" in out
    seed = tmp_path / "o" / "yesno" / "seed-1"
    runs = {arm: json.loads((seed / arm / "metrics.json").read_text()) for arm in ("fft", "lora", "student", "kd-lora")}
    assert all(m["kind"] == "generation" and m["status"] == "finished" for m in runs.values())
    assert runs["student"]["method"] == runs["kd-lora"]["method"] == "kd-lora"
    assert yaml.safe_load((seed / "student" / "config.yaml").read_text())["kd"]["alpha"] == 1.0
    assert runs["student"]["teacher_rows_computed"] == runs["kd-lora"]["teacher_rows_computed"] == 0  # compare did
    assert runs["kd-lora"]["vocabulary"] == len(WORDS) and "kl" in runs["student"]
    report = (tmp_path / "o" / "generative.md").read_text()
    assert "| yesno | kd-lora | 1 |" in report and "| yesno | student | 1 |" in report
    # A rerun reuses every arm; a label budget has no labels to draw from a language model's data.
    assert main(args) == 0 and capsys.readouterr().out.count("reusing the finished run") == 4
    assert main([*args, "--label-budget", "10"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "a language model's data has no labels to draw" in err[0]


def test_bench_measures_a_causal_lms_methods_per_token(lm_setup, tmp_path, capsys):
    """Parameters per rank, training tokens/s and peak memory per method (a child each), the teacher cache's bytes
    per token, and greedy tokens/s of teacher and student, on the validation prompts of the user's data."""
    out = tmp_path / "bench"
    args = ["bench", "--teacher-model", str(lm_setup["model"]), "--student-layers", "0,2", "--ranks", "4,8",
            "--batch-size", "2", "--seq-len", "16", "--runs", "2", "--warmup", "1", "--max-new-tokens", "4",
            "--eval-batch-size", "4", "--train-file", str(lm_setup["train"]), "--validation-file",
            str(lm_setup["dev"]), "--prompt-column", "prompt", "--completion-column", "completion",
            "--output-dir", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "causal LM" in capsys.readouterr().out
    result = json.loads((out / "bench.json").read_text())
    rows = {(r["method"], r["rank"]): r for r in result["parameters"]}
    assert set(rows) == {("fft", None), ("lora", 4), ("lora", 8), ("kd-lora", 4), ("kd-lora", 8)}
    assert rows[("lora", 8)]["lora_params"] == 2 * rows[("lora", 4)]["lora_params"] > 0
    total = {k: r["total_params"] for k, r in rows.items()}
    assert total[("kd-lora", 4)] < total[("fft", None)] == total[("lora", 4)]
    assert all(result["train"][m]["tokens_per_second"] > 0 and result["train"][m]["peak_mb"] > 0
               for m in ("fft", "lora", "kd-lora"))  # fmt: skip
    cache = result["teacher_cache"]
    assert cache["k"] == 16 and cache["rows"] == 8 and cache["cached_tokens"] == 16  # answer + end of text, per row
    assert 16 * 6 + 4 <= cache["bytes_per_token"] < 16 * 6 + 4 + 200  # values, ids, tail, plus the files' headers
    gen = result["generation"]
    assert gen["rows"] == 4 and gen["new_tokens"] == 4
    assert set(gen["arms"]) == {"teacher", "student_lora_unmerged", "student_merged"}
    assert all(a["tokens_per_second"] > 0 and a["runs"] == 2 for a in gen["arms"].values())
    assert "Greedy generation" in (out / "bench.md").read_text()


def test_two_cpu_processes_count_every_validation_token_once(lm_setup, tmp_path):
    """accelerate launch, 2 processes (gloo): 3 validation batches over 2 processes, none counted twice: the NLL is
    the one a single process computes on the merged model."""
    import subprocess

    from test_distributed import LAUNCH
    from transformers import AutoModelForCausalLM

    from kdlora.lm import encode_rows
    from kdlora.lm_data import LMRow
    from kdlora.topk_cache import predicted

    out = tmp_path / "run"
    cmd = [*LAUNCH, *lm_args(lm_setup, out, "--method", "kd-lora", "--teacher-model", str(lm_setup["model"]),
                             "--teacher-epochs", "1", "--teacher-lr", "3e-3", "--student-layers", "0,2", "--lr",
                             "3e-3", "--epochs", "1", "--eval-batch-size", "2", "--max-eval-samples", "5",
                             "--generate-rows", "0")[1:]]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["num_processes"] == 2 and len(m["train_loss"]) == 4  # 28 rows / (4 per process x 2)
    model = AutoModelForCausalLM.from_pretrained(out / "merged").eval()
    rows = [LMRow(i, prompt=r["prompt"], completion=r["completion"])
            for i, r in enumerate(map(json.loads, lm_setup["dev"].read_text().splitlines()))][:5]  # fmt: skip
    total = count = 0
    with torch.no_grad():
        for e in encode_rows(rows, tokenizer(), 128):
            at = predicted(e.labels)
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0, at, : len(WORDS)]
            total += torch.nn.functional.cross_entropy(
                logits, torch.tensor([e.labels[t + 1] for t in at]), reduction="sum"
            )
            count += len(at)
    assert m["nll"] == pytest.approx(float(total) / count, rel=1e-5)
