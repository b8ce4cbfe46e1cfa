"""Turn a local GLUE task into instruction data for a causal language model: a question about the sentence(s), the
answer a label word, as chat messages and as a prompt and a completion (JSONL).

    python scripts/glue_to_instructions.py ../shared/glue runs/data/cola-chat --task cola --train 400 --dev 150
    python scripts/glue_to_instructions.py ../shared/glue runs/data/para --task mrpc-paraphrase --train 300 --dev 100

writes OUT/train.jsonl and OUT/dev.jsonl, one row a line: {"id", "messages": [user, assistant], "prompt",
"completion", "label"}. `--train N` draws N training rows at random (seeded) from the training split, `--dev M` the
first M of the dev split (GLUE's test labels are hidden). Train with --messages-column messages (the model's own chat
template) or --prompt-column prompt --completion-column completion; the answers are single label words, so exact
match is the task's accuracy.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
from pathlib import Path

# Per task: the file's columns (CoLA's have no header), the label column, the question, and the label words.
TASKS = {
    "cola": {
        "columns": ("source", "label", "original_label", "sentence"),
        "text": ("sentence",),
        "question": "Is the following sentence grammatically acceptable English? Answer yes or no.",
        "words": {"0": "no", "1": "yes"},
    },
    "rte": {
        "columns": None,
        "text": ("sentence1", "sentence2"),
        "question": "Does the first text entail the second? Answer yes or no.",
        "words": {"not_entailment": "no", "entailment": "yes"},
    },
    "mrpc": {
        "columns": None,
        "text": ("#1 String", "#2 String"),
        "label": "Quality",
        "question": "Do the two sentences mean the same thing? Answer yes or no.",
        "words": {"0": "no", "1": "yes"},
    },
}
# MRPC's paraphrase pairs as a generation task: rewrite the first sentence; the answer is the second (a sentence of
# ~20 tokens, where the teacher's distribution over every token is what distillation passes on; exact match is rare).
TASKS["mrpc-paraphrase"] = {
    "columns": None,
    "text": ("#1 String",),
    "label": "Quality",
    "question": "Rewrite the following sentence in other words.",
    "answer": "#2 String",
    "keep": "1",
}
DIRS = {"cola": "CoLA", "rte": "RTE", "mrpc": "MRPC", "mrpc-paraphrase": "MRPC"}


def read(path: Path, task: str) -> list[dict[str, str]]:
    """The rows of a GLUE TSV file as dicts (quoting off: MRPC's stray quotes are text)."""
    spec = TASKS[task]
    with path.open(encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = list(spec["columns"]) if spec["columns"] else next(reader)
        return [dict(zip(header, row, strict=False)) for row in reader if row]


def instruction(row: dict[str, str], task: str, i: int) -> dict:
    spec = TASKS[task]
    texts = "\n".join(row[c] for c in spec["text"])
    answer = row[spec["answer"]] if "answer" in spec else spec["words"][row[spec.get("label", "label")]]
    user = f"{spec['question']}\n\n{texts}"
    return {
        "id": i,
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}],
        "prompt": f"{user}\nAnswer:",
        "completion": f" {answer}",
        "label": answer,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("glue_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--task", choices=sorted(TASKS), default="cola", help="mrpc-paraphrase: rewrite a sentence")
    parser.add_argument("--train", type=int, default=400, help="training rows drawn at random (seeded)")
    parser.add_argument("--dev", type=int, default=150, help="the first dev rows")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train = read(args.glue_dir / DIRS[args.task] / "train.tsv", args.task)
    dev = read(args.glue_dir / DIRS[args.task] / "dev.tsv", args.task)
    if "keep" in TASKS[args.task]:  # only the rows of that label (the paraphrases)
        label = TASKS[args.task]["label"]
        train, dev = ([r for r in rows if r[label] == TASKS[args.task]["keep"]] for rows in (train, dev))
    train = random.Random(args.seed).sample(train, min(args.train, len(train)))
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train), ("dev", dev[: args.dev])):
        lines = [json.dumps(instruction(r, args.task, i)) for i, r in enumerate(rows)]
        (args.out_dir / f"{name}.jsonl").write_text("".join(f"{line}\n" for line in lines))
        words: dict[str, int] = {}
        for r in rows:
            w = TASKS[args.task].get("words", {}).get(r[TASKS[args.task].get("label", "label")], "a sentence")
            words[w] = words.get(w, 0) + 1
        counts = ", ".join(f"{w} {n}" for w, n in sorted(words.items()))
        print(f"{args.out_dir / name}.jsonl: {len(rows)} rows ({counts})")


if __name__ == "__main__":
    main()
