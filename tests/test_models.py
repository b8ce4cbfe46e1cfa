import pytest
import torch
from conftest import VOCAB, make_tokenizer, tiny_bert_config

from kdlora.config import LoraArgs
from kdlora.errors import KdloraError
from kdlora.models import (
    add_lora,
    count_parameters,
    deployed_parameters,
    enable_gradient_checkpointing,
    head_modules,
    keep_layers,
    lora_targets,
    merge,
    resolve_target_modules,
)


def _tiny(kind: str):
    from transformers import (
        BertForSequenceClassification,
        DebertaV2Config,
        DebertaV2ForSequenceClassification,
        DistilBertConfig,
        DistilBertForSequenceClassification,
        RobertaConfig,
        RobertaForSequenceClassification,
    )

    common = dict(vocab_size=len(VOCAB), num_labels=2)
    torch.manual_seed(0)
    if kind == "bert":
        return BertForSequenceClassification(tiny_bert_config(num_labels=2))
    if kind == "distilbert":
        return DistilBertForSequenceClassification(
            DistilBertConfig(dim=32, n_layers=2, n_heads=2, hidden_dim=37, max_position_embeddings=64, **common)
        )
    if kind == "roberta":
        return RobertaForSequenceClassification(
            RobertaConfig(
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=2,
                intermediate_size=37,
                max_position_embeddings=70,
                **common,
            )
        )
    return DebertaV2ForSequenceClassification(
        DebertaV2Config(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            max_position_embeddings=64,
            pooler_hidden_size=32,
            **common,
        )
    )


TARGETS = {
    "bert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "roberta": ["query", "value"],
    "deberta": ["query_proj", "value_proj"],
}
HEADS = {
    "bert": ["classifier", "pooler"],
    "distilbert": ["classifier", "pre_classifier"],
    "roberta": ["classifier"],
    "deberta": ["classifier", "pooler"],
}


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_lora_targets_and_only_lora_and_head_change(kind):
    model = _tiny(kind)
    assert resolve_target_modules(model, None) == TARGETS[kind]
    assert head_modules(model) == HEADS[kind]
    model = add_lora(model, LoraArgs(r=4, lora_alpha=8, lora_dropout=0.0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(5, len(VOCAB), (4, 9))
    for _ in range(2):  # two steps: LoRA B starts at zero, so A moves only from the second step on
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids).logits, torch.tensor([0, 1, 0, 1]))
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable


def test_unknown_target_module_is_a_clear_error():
    with pytest.raises(KdloraError, match="'?qkv'? not found"):
        resolve_target_modules(_tiny("bert"), ["qkv"])


def test_dotted_target_suffixes_pick_modules_as_peft_does():
    """`output.dense` adapts the attention-output and FFN-output projections of every layer, never the pooler."""
    targets = ["query", "key", "value", "output.dense", "intermediate.dense"]
    assert resolve_target_modules(_tiny("bert"), targets) == targets
    model = add_lora(_tiny("bert"), LoraArgs(r=8, target_modules=targets))
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n}
    assert len(adapted) == 4 * 6  # layers x (q, k, v, attention output, intermediate, output)
    assert not any("pooler" in n for n in adapted)
    with pytest.raises(KdloraError, match="pooler.query not found"):
        resolve_target_modules(_tiny("bert"), ["pooler.query"])


@pytest.mark.parametrize("kind", sorted(TARGETS))
def test_all_linear_adapts_every_linear_layer_but_the_head(kind):
    model = _tiny(kind)
    heads = HEADS[kind]
    body = {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not any(p in heads for p in n.split("."))
    }
    peft_model = add_lora(model, LoraArgs(r=4, target_modules=["all-linear"]))
    adapted = {
        n.split("base_model.model.", 1)[1].rsplit(".lora_A", 1)[0]
        for n, _ in peft_model.named_parameters()
        if ".lora_A." in n
    }
    assert adapted == body and len(body) >= 4 * 2  # at least query and value of both layers
    if kind == "bert":
        assert resolve_target_modules(_tiny(kind), ["all-linear"]) == [
            "query",
            "key",
            "value",
            "output.dense",
            "intermediate.dense",
        ]


def test_lora_targets_are_spelled_out_whatever_the_config_said():
    spelled = lora_targets(add_lora(_tiny("bert"), LoraArgs(target_modules=["all-linear"])))
    listed = ["value", "intermediate.dense", "query", "output.dense", "key"]
    assert spelled == lora_targets(add_lora(_tiny("bert"), LoraArgs(target_modules=listed))) == sorted(listed)
    assert lora_targets(add_lora(_tiny("bert"), LoraArgs(target_modules=None))) == ["query", "value"]
    assert lora_targets(_tiny("bert")) is None


def test_parameter_counts_follow_the_lora_formula():
    model = add_lora(_tiny("bert"), LoraArgs(r=8, target_modules=None))
    counts = count_parameters(model)
    assert counts["lora_params"] == 4 * 2 * 8 * (32 + 32)  # layers x (q, v) x r x (d_in + d_out)
    head = (32 * 32 + 32) + (32 * 2 + 2)  # pooler + classifier
    assert counts["trainable_params"] == counts["lora_params"] + head
    assert deployed_parameters(model) == sum(p.numel() for p in _tiny("bert").parameters())


def test_bert_base_query_value_lora_count():
    from transformers import BertConfig, BertForSequenceClassification

    with torch.device("meta"):
        model = add_lora(BertForSequenceClassification(BertConfig()), LoraArgs(r=8, target_modules=None))
    assert count_parameters(model)["lora_params"] == 294_912  # 12 layers x 2 x 8 x (768 + 768)


def test_keep_layers_builds_a_student():
    model = _tiny("bert")
    third = model.bert.encoder.layer[3].attention.self.query.weight.clone()
    keep_layers(model, [1, 3])
    assert model.config.num_hidden_layers == 2 and len(model.bert.encoder.layer) == 2
    assert torch.equal(model.bert.encoder.layer[1].attention.self.query.weight, third)
    assert model(input_ids=torch.randint(5, 30, (2, 7))).logits.shape == (2, 2)
    with pytest.raises(KdloraError, match="out of range"):
        keep_layers(_tiny("bert"), [0, 4])


def test_merged_equals_unmerged_and_reloaded_adapter(tmp_path):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    base = _tiny("bert")
    base.save_pretrained(tmp_path / "base")
    model = add_lora(base, LoraArgs(r=4, lora_alpha=8, lora_dropout=0.0))
    with torch.no_grad():  # make the adapter non-trivial
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    ids = torch.randint(5, len(VOCAB), (3, 11))
    unmerged = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    merged = merge(model)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(merged(input_ids=ids).logits, unmerged, atol=1e-5, rtol=0)
    reloaded = PeftModel.from_pretrained(
        BertForSequenceClassification.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    torch.testing.assert_close(reloaded(input_ids=ids).logits, unmerged, atol=1e-6, rtol=0)
    make_tokenizer(tmp_path / "tok")


@pytest.mark.parametrize(
    "variant",
    [{"use_dora": True}, {"use_rslora": True}, {"init_lora_weights": "pissa"}, {"init_lora_weights": "olora"},
     {"init_lora_weights": "gaussian"}],
)  # fmt: skip
def test_peft_lora_variants_start_at_the_base_model_and_merge_exactly(variant):
    """DoRA, rsLoRA and PiSSA/OLoRA initialisation come from peft: the adapted model starts where the base model is
    (PiSSA/OLoRA move the principal part of W into A·B), and merging changes no output."""
    from transformers import BertForSequenceClassification

    from kdlora.models import add_lora, count_parameters, merge

    torch.manual_seed(0)
    base = BertForSequenceClassification(tiny_bert_config()).eval()
    x = torch.randint(5, len(VOCAB), (2, 7))
    with torch.no_grad():
        ref = base(input_ids=x).logits
        model = add_lora(base, LoraArgs(r=4, lora_dropout=0.0, target_modules=None, **variant)).eval()
        out = model(input_ids=x).logits
        # a trained-looking adapter: B away from zero, so that merging has something to fold
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(0.05 * torch.randn_like(p))
        moved = model(input_ids=x).logits
        counts = count_parameters(model)
        merged = merge(model)(input_ids=x).logits
    assert torch.allclose(out, ref, atol=1e-5) and torch.allclose(merged, moved, atol=1e-5)
    dora = 4 * 2 * 32 if variant.get("use_dora") else 0  # one magnitude per output feature of query and value
    assert counts["lora_params"] == 4 * 2 * 4 * 64 + dora


def _tiny_mpnet():
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(0)
    config = MPNetConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
        max_position_embeddings=70, num_labels=2,
    )  # fmt: skip
    return MPNetForSequenceClassification(config)


@pytest.mark.parametrize("make", [lambda: _tiny("bert"), _tiny_mpnet], ids=["transformers", "own-wrapper"])
def test_gradient_checkpointing_keeps_less_and_changes_nothing(make):
    # BERT has transformers' checkpointing; MPNet has none there, so kdlora wraps its layers itself
    ids = torch.randint(5, len(VOCAB), (4, 12), generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 1, 0])

    def step(checkpointing: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
        model = add_lora(make(), LoraArgs(r=4, target_modules=["all-linear"]))
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        kept = []
        torch.manual_seed(1)  # the same dropout masks, recomputed or not
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        return loss.detach(), grads, sum(kept)

    loss, grads, kept = step(False)
    loss_gc, grads_gc, kept_gc = step(True)
    assert kept_gc < kept / 2  # each layer's insides are recomputed, not kept
    assert torch.allclose(loss, loss_gc)
    assert grads.keys() == grads_gc.keys() and any(g.abs().sum() > 0 for g in grads.values())
    for name, g in grads.items():
        assert torch.allclose(g, grads_gc[name], atol=1e-6), name
