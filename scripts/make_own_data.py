"""Make an example of "your own data" from GLUE CoLA: other column names, string labels, an id column, CSV + JSONL.

    python scripts/make_own_data.py ../shared/glue runs/data/grammar

writes OUT/train.csv (id, sentence_text, verdict), OUT/dev.jsonl (the same fields) and OUT/unlabelled.txt (the dev
sentences, one a line, for `kdlora predict --input-file`). The verdicts are "acceptable" / "unacceptable".
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

VERDICT = {"0": "unacceptable", "1": "acceptable"}


def read_cola(path: Path) -> list[tuple[str, str]]:
    """(sentence, verdict) per row of a CoLA file (no header: source, label, original label, sentence)."""
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            _, label, _, sentence = line.split("\t")
            rows.append((sentence, VERDICT[label]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("glue_dir", type=Path)
    parser.add_argument("out_dir", type=Path)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    train = read_cola(args.glue_dir / "CoLA" / "train.tsv")
    dev = read_cola(args.glue_dir / "CoLA" / "dev.tsv")
    with (args.out_dir / "train.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "sentence_text", "verdict"])
        writer.writerows((f"tr-{i}", s, v) for i, (s, v) in enumerate(train))
    with (args.out_dir / "dev.jsonl").open("w") as f:
        for i, (s, v) in enumerate(dev):
            f.write(json.dumps({"id": f"dev-{i}", "sentence_text": s, "verdict": v}) + "\n")
    (args.out_dir / "unlabelled.txt").write_text("".join(s + "\n" for s, _ in dev))
    print(f"wrote {len(train)} training and {len(dev)} validation rows, {len(dev)} unlabelled lines, to {args.out_dir}")


if __name__ == "__main__":
    main()
