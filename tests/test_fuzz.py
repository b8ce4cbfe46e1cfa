"""Malformed TSV content: the GLUE reader returns rows or raises its one clear error, and never crashes otherwise."""

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdlora.data import Example, read_glue_tsv
from kdlora.errors import KdloraError
from kdlora.tasks import get_task

# Cells built from the characters that break TSV readers: tabs, newlines, quotes, BOMs, odd unicode.
CELL = st.one_of(
    st.text(alphabet=list('ab "\t\r\n\ufeff\\é01.'), max_size=12),
    st.sampled_from(["entailment", "not_entailment", "0", "1", "2.5", "index", "label", "sentence1"]),
)
CONTENT = st.one_of(
    st.binary(max_size=200),
    st.lists(st.lists(CELL, min_size=0, max_size=5).map("\t".join), max_size=6).map("\n".join).map(str.encode),
    st.lists(st.lists(CELL, min_size=4, max_size=4).map("\t".join), max_size=6)
    .map(lambda rows: "index\tsentence1\tsentence2\tlabel\n" + "\n".join(rows))
    .map(str.encode),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(content=CONTENT, task=st.sampled_from(["cola", "rte", "stsb", "mrpc"]), split=st.sampled_from(["train", "test"]))
def test_reader_parses_or_raises_the_clear_error(content, task, split):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "train.tsv"
        path.write_bytes(content)
        try:
            rows = read_glue_tsv(path, get_task(task), split)
        except KdloraError as exc:
            assert "\n" not in str(exc) and "\r" not in str(exc)  # one line on the terminal
            return
    assert all(isinstance(r, Example) for r in rows)
    if split == "train" and get_task(task).kind == "classification":
        assert all(r.label in range(get_task(task).num_labels) for r in rows)
