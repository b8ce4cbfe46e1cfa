"""The causal-LM teacher's top-k cache: what it reads back is what was computed (ids past 16 bits too), a kill
between shards resumes at the first unfinished one, another fingerprint is refused, and it is sized per token."""

import pytest
import torch

from kdlora.errors import KdloraError
from kdlora.losses import topk_kd_sum, topk_targets
from kdlora.topk_cache import MANIFEST, TopKCache

VOCAB = 151_936  # Qwen2.5's: token ids need more than 16 bits


def _rows(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 6, (n,), generator=g).tolist()
    return [torch.randn(t, 300, generator=g) * 3 for t in lengths]


def _teacher(rows, calls):
    def compute(ids):
        calls.extend(ids)
        for i in ids:
            logits = torch.full((rows[i].shape[0], VOCAB), -20.0)
            logits[:, VOCAB - 300 :] = rows[i]  # the mass sits on ids above 65,535
            yield logits

    return compute


PARTS = {"teacher": "sha-of-weights", "tokenizer": "sha-of-vocab", "data": "sha-of-rows", "max_length": 128}


def test_what_is_read_back_is_what_the_teacher_gave(tmp_path):
    rows, calls = _rows(7), []
    cache = TopKCache(tmp_path, PARTS, k=8, temperature=2.0, shard_rows=3)
    assert cache.fill(len(rows), _teacher(rows, calls)) == 7 and calls == list(range(7))
    assert cache.complete(7)
    for i, r in enumerate(rows):
        logits = torch.full((r.shape[0], VOCAB), -20.0)
        logits[:, VOCAB - 300 :] = r
        log_top, idx = topk_targets(logits, 8, 2.0)
        got_top, got_idx, got_tail = cache.row(i)
        assert torch.equal(got_idx, idx) and int(got_idx.max()) > 2**16
        torch.testing.assert_close(got_top, log_top.half().float())
        # the loss from the cache is the loss from the teacher's own logits, to fp16's precision
        student = torch.randn(r.shape[0], VOCAB)
        mask = torch.ones(r.shape[0])
        from_cache = topk_kd_sum(student, got_top, got_idx, mask, 2.0, teacher_log_tail=got_tail)
        torch.testing.assert_close(from_cache, topk_kd_sum(student, log_top, idx, mask, 2.0), rtol=2e-3, atol=2e-3)
    assert cache.bytes_per_token() < 8 * 6 + 4 + 60  # K·(2 + 4) + 4 bytes a token, and the .npy headers


def test_a_kill_between_shards_resumes_at_the_first_unfinished_one(tmp_path):
    rows, calls = _rows(8), []
    compute = _teacher(rows, calls)

    def dies_in_third_shard(ids):
        if ids[0] >= 6:
            raise KeyboardInterrupt
        yield from compute(ids)

    cache = TopKCache(tmp_path, PARTS, k=4, shard_rows=3)
    with pytest.raises(KeyboardInterrupt):
        cache.fill(8, dies_in_third_shard)
    assert not cache.complete(8) and calls == list(range(6))
    (cache.dir / "shard-00002.values.npy.tmp").write_bytes(b"half")  # what a kill mid-write could leave
    calls.clear()
    again = TopKCache(tmp_path, PARTS, k=4, shard_rows=3)
    assert again.fill(8, compute) == 2 and calls == [6, 7] and again.complete(8)
    assert again.fill(8, compute) == 0  # computed once
    assert torch.equal(again.row(7)[1], topk_targets(next(compute([7])), 4)[1])


def test_another_teacher_tokenizer_or_k_is_another_cache_and_a_mismatch_is_one_line(tmp_path):
    rows, calls = _rows(3), []
    TopKCache(tmp_path, PARTS, k=4).fill(3, _teacher(rows, calls))
    for other in ({**PARTS, "teacher": "other"}, {**PARTS, "tokenizer": "other template"}):
        assert not TopKCache(tmp_path, other, k=4).complete(3)
    assert not TopKCache(tmp_path, PARTS, k=5).complete(3)
    assert not TopKCache(tmp_path, PARTS, k=4, temperature=2.0).complete(3)
    cache = TopKCache(tmp_path, PARTS, k=4)
    manifest = (cache.dir / MANIFEST).read_text().replace(cache.key, "0" * 64)
    (cache.dir / MANIFEST).write_text(manifest)  # a directory whose manifest names another fingerprint
    with pytest.raises(KdloraError, match="belongs to another teacher, tokenizer or data") as err:
        cache.fill(3, _teacher(rows, calls))
    assert "\n" not in str(err.value)


def test_a_causal_teacher_fills_the_cache_on_the_learnt_positions_only(tmp_path):
    from test_lm_data import WORDS, tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdlora.lm_data import LMRow, encode
    from kdlora.topk_cache import fill_from_model, predicted

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
    model = LlamaForCausalLM(config).eval()  # 16 output rows for 13 tokens: 3 padding rows
    tok = tokenizer()
    rows = [LMRow(0, prompt="is the cat good ?", completion="yes"), LMRow(1, text="the cat is good"),
            LMRow(2, prompt="the cat ?", completion="no no")]  # fmt: skip
    encoded = [encode(r, tok, 32) for r in rows]
    cache = TopKCache(tmp_path, PARTS, k=4, shard_rows=2)
    assert fill_from_model(cache, model, encoded, vocab=len(WORDS), batch_size=2, pad_id=tok.pad_token_id) == 3
    for (input_ids, labels), i in zip(encoded, range(3), strict=True):
        alone = model(input_ids=torch.tensor([input_ids])).logits[0, predicted(labels), : len(WORDS)]
        log_top, idx = topk_targets(alone, 4)
        got_top, got_idx, _ = cache.row(i)
        assert len(got_idx) == sum(y != -100 for y in labels[1:])  # one entry per learnt token
        assert torch.equal(got_idx, idx) and int(got_idx.max()) < len(WORDS)  # no padding row is ever a target
        torch.testing.assert_close(got_top, log_top.half().float(), rtol=1e-3, atol=1e-3)
