"""A causal-LM teacher's distribution, cached once: per completion token its K most probable tokens' log-probs at
temperature T (fp16) and their ids (int32: every vocabulary here fits, and 151,936 does not fit in 16 bits), plus
the log of the mass outside them (the tail bucket, fp32, so a tail near 0 keeps its digits).

Layout, under one directory per fingerprint (teacher weights, tokenizer, data, max length, K and T):

    manifest.json            the fingerprint's parts, K, T, and the shards finished so far (written last, atomically)
    shard-00000.values.npy   [tokens, K] float16
    shard-00000.indices.npy  [tokens, K] int32
    shard-00000.tail.npy     [tokens] float32
    shard-00000.offsets.npy  [rows + 1] int64: row r's tokens are offsets[r]:offsets[r + 1] of the shard

Each shard's files are written under temporary names and renamed before the manifest names it, so a kill leaves
finished shards and, at worst, a temporary file that is ignored: the next run resumes at the first row of the
first unfinished shard. Shards are read memory-mapped: the cache need not fit in memory.

K defaults to 64: at T = 1 a 1.5B teacher's top 64 tokens hold about 98% of the mass on ordinary text, and the tail
bucket carries the rest exactly (losses.topk_kd_sum), at 6 bytes a token a position plus 4 for the tail."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdlora.errors import KdloraError
from kdlora.io import atomic_file, atomic_write_json
from kdlora.losses import IGNORE, log_tail, topk_targets

DEFAULT_K = 64
MANIFEST = "manifest.json"
FILES = ("values", "indices", "tail", "offsets")


def fingerprint(parts: dict[str, Any]) -> str:
    """sha256 of the named parts (the teacher's weights hash, the tokenizer's vocabulary, special tokens and chat
    template, the data's hash, max length, K and T), in a stable order."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


@dataclass(frozen=True)
class Shard:
    values: np.ndarray  # [tokens, K] float16, memory-mapped
    indices: np.ndarray  # [tokens, K] int32
    tail: np.ndarray  # [tokens] float32
    offsets: np.ndarray  # [rows + 1] int64


class TopKCache:
    """The cache of one fingerprint: `fill` computes what is missing, `row(r)` reads row r's targets."""

    def __init__(self, root: str | Path, parts: dict[str, Any], k: int = DEFAULT_K, temperature: float = 1.0,
                 shard_rows: int = 256) -> None:  # fmt: skip
        if k <= 0 or shard_rows <= 0:
            raise KdloraError(f"the top-k cache needs k > 0 and rows per shard > 0, got {k} and {shard_rows}")
        self.parts = {**parts, "k": k, "temperature": temperature}
        self.key = fingerprint(self.parts)
        self.dir = Path(root) / self.key[:16]
        self.k, self.temperature, self.shard_rows = k, temperature, shard_rows
        self._shards: dict[int, Shard] = {}

    # -- what is there ------------------------------------------------------------------------------------------------

    def manifest(self) -> dict[str, Any]:
        path = self.dir / MANIFEST
        if not path.is_file():
            return {"fingerprint": self.key, "parts": self.parts, "k": self.k, "shard_rows": self.shard_rows,
                    "temperature": self.temperature, "shards": [], "rows": None}  # fmt: skip
        manifest = json.loads(path.read_text())
        if manifest.get("fingerprint") != self.key:
            raise KdloraError(f"{self.dir}: the top-k cache belongs to another teacher, tokenizer or data: remove it")
        return manifest

    def complete(self, rows: int) -> bool:
        manifest = self.manifest()
        return manifest["rows"] == rows and len(manifest["shards"]) == -(-rows // self.shard_rows)

    # -- filling -----------------------------------------------------------------------------------------------------

    def fill(self, rows: int, teacher: Callable[[Sequence[int]], Iterable[torch.Tensor]]) -> int:
        """Compute the shards not yet written. `teacher(row_ids)` yields, per row in order, the teacher's logits on
        that row's completion tokens, [tokens, V]. Returns the number of rows computed now (0: all were cached)."""
        manifest = self.manifest()
        if manifest["rows"] not in (None, rows):
            raise KdloraError(f"{self.dir}: the top-k cache holds {manifest['rows']} rows, the data {rows}")
        done = set(manifest["shards"])
        self.dir.mkdir(parents=True, exist_ok=True)
        computed = 0
        for shard in range(-(-rows // self.shard_rows)):
            if shard in done:
                continue
            ids = list(range(shard * self.shard_rows, min(rows, (shard + 1) * self.shard_rows)))
            self._write(shard, [self._targets(logits) for logits in teacher(ids)], len(ids))
            computed += len(ids)
            done.add(shard)
            manifest.update(rows=rows, shards=sorted(done))
            atomic_write_json(self.dir / MANIFEST, manifest)  # names the shard only once its files are in place
        return computed

    def _targets(self, logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        log_top, idx = topk_targets(logits, self.k, self.temperature)
        no_tail = idx.shape[-1] == logits.shape[-1]
        tail = torch.full_like(log_top[:, 0], float("-inf")) if no_tail else log_tail(log_top)
        return log_top.half().numpy(), idx.to(torch.int32).numpy(), tail.float().numpy()

    def _write(self, shard: int, rows: list[tuple[np.ndarray, ...]], expected: int) -> None:
        if len(rows) != expected:
            raise KdloraError(f"the teacher gave {len(rows)} rows for a shard of {expected}")
        lengths = [len(r[0]) for r in rows]
        arrays = {
            "values": np.concatenate([r[0] for r in rows]).reshape(-1, self.k),
            "indices": np.concatenate([r[1] for r in rows]).reshape(-1, self.k),
            "tail": np.concatenate([r[2] for r in rows]),
            "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        }
        for name in FILES:
            with atomic_file(self._path(shard, name), "wb") as f:
                np.save(f, arrays[name])

    def _path(self, shard: int, name: str) -> Path:
        return self.dir / f"shard-{shard:05d}.{name}.npy"

    # -- reading -----------------------------------------------------------------------------------------------------

    def row(self, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Row r's cached targets: log-probs [tokens, K] float32, token ids [tokens, K] int64, tail log-mass
        [tokens]."""
        shard, at = divmod(r, self.shard_rows)
        if shard not in self._shards:
            try:
                self._shards[shard] = Shard(*(np.load(self._path(shard, n), mmap_mode="r") for n in FILES))
            except (OSError, ValueError) as exc:
                raise KdloraError(f"{self.dir}: shard {shard} of the top-k cache is damaged: remove the cache") from exc
        s = self._shards[shard]
        a, b = int(s.offsets[at]), int(s.offsets[at + 1])
        return (torch.from_numpy(np.array(s.values[a:b], dtype=np.float32)),
                torch.from_numpy(np.array(s.indices[a:b], dtype=np.int64)),
                torch.from_numpy(np.array(s.tail[a:b], dtype=np.float32)))  # fmt: skip

    def bytes_per_token(self) -> float:
        """The cache's size on disk over the tokens it holds."""
        manifest = self.manifest()
        size = sum(self._path(s, n).stat().st_size for s in manifest["shards"] for n in FILES)
        tokens = sum(int(np.load(self._path(s, "offsets"), mmap_mode="r")[-1]) for s in manifest["shards"])
        return size / max(tokens, 1)


def predicted(labels: Sequence[int]) -> list[int]:
    """The positions whose next token is learnt: t where labels[t + 1] is not IGNORE (a causal LM predicts token
    t + 1 at position t), in order; the cache holds one entry per such position."""
    return [t for t in range(len(labels) - 1) if labels[t + 1] != IGNORE]


@torch.inference_mode()
def fill_from_model(cache: TopKCache, model: Any, encoded: Sequence[tuple[list[int], list[int]]], vocab: int,
                    batch_size: int = 8, pad_id: int = 0) -> int:  # fmt: skip
    """Fill `cache` with a causal LM teacher's distribution on the learnt positions of each encoded row (from
    lm_data.encode), `batch_size` rows a forward pass, right-padded (a causal model's real positions do not see the
    padding), logits cut to the `vocab` rows the tokenizer uses. Returns the rows computed now."""
    model.eval()
    device = next(model.parameters()).device

    def teacher(ids: Sequence[int]) -> Iterable[torch.Tensor]:
        for start in range(0, len(ids), batch_size):
            batch = [encoded[i] for i in ids[start : start + batch_size]]
            width = max(len(x) for x, _ in batch)
            inputs = torch.full((len(batch), width), pad_id, dtype=torch.long)
            mask = torch.zeros_like(inputs)
            for row, (x, _) in enumerate(batch):
                inputs[row, : len(x)], mask[row, : len(x)] = torch.tensor(x), 1
            logits = model(input_ids=inputs.to(device), attention_mask=mask.to(device)).logits.float().cpu()
            for row, (_, labels) in enumerate(batch):
                yield logits[row, predicted(labels), :vocab]

    return cache.fill(len(encoded), teacher)
