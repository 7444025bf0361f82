"""Model architecture: load classifiers and tokenizers from local folders or hub ids, select encoder
layers (students keep some of their teacher's), resize layers to a pruning plan and rebuild pruned
models from their ``pruning_plan.json``, and build tiny random classifiers for tests.

A structurally pruned model no longer fits its Hugging Face config (every layer keeps its own number
of heads and neurons), so its folder holds ``pruning_plan.json`` with the kept indices;
``load_classifier`` rebuilds the smaller layers from it before loading the weights.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tasks.errors import ConfigError

PLAN_FILENAME = "pruning_plan.json"

TINY_WORDS = (
    "good great excellent wonderful superb loved enjoyable brilliant fun delightful "
    "bad awful terrible boring dull hated poor worst waste disappointing "
    "movie film plot actor story scene music ending the a and was is it this very not really"
).split()


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(str(source))


def load_classifier(source: str | Path, labels: list[str] | None = None, attention: str = "eager") -> PreTrainedModel:
    """A sequence classifier from a folder or hub id; a new head is created when labels are given.

    A folder written by the pruning step (``pruning_plan.json``) is rebuilt with its smaller layers.
    ``attention="eager"`` (the default) keeps the exported ONNX graph in the shape ONNX Runtime's
    transformer optimizer recognises for attention fusion; "sdpa" trains faster.
    """
    if (Path(str(source)) / PLAN_FILENAME).is_file():
        return load_pruned(Path(str(source)), attention)
    kwargs: dict = {"attn_implementation": attention}
    if labels is not None:
        kwargs.update(
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={name: index for index, name in enumerate(labels)},
            ignore_mismatched_sizes=True,
        )
    return AutoModelForSequenceClassification.from_pretrained(str(source), **kwargs)


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of a BERT-style encoder (``<base>.encoder.layer``)."""
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(
            f"{type(model).__name__} has no <base>.encoder.layer list: layer-copy initialisation supports "
            "BERT-style encoders (BERT, MiniLM, RoBERTa, MPNet)"
        )
    return layers


def parameter_count(model: torch.nn.Module) -> int:
    return sum(parameter.numel() for parameter in model.parameters())


def student_layer_map(teacher_layers: int, student_layers: int) -> list[int]:
    """Which teacher layers the student copies: evenly spaced, always including the last one.

    6 -> 3 gives [1, 3, 5] ("every other layer"); 12 -> 4 gives [2, 5, 8, 11].
    """
    if not 1 <= student_layers <= teacher_layers:
        raise ConfigError(f"student_layers must be in 1..{teacher_layers}, got {student_layers}")
    step = teacher_layers / student_layers
    return [round((index + 1) * step) - 1 for index in range(student_layers)]


def build_student(teacher: torch.nn.Module, student_layers: int) -> tuple[torch.nn.Module, list[int]]:
    """A copy of ``teacher`` keeping only the mapped encoder layers (embeddings, pooler and head kept)."""
    chosen = student_layer_map(len(encoder_layers(teacher)), student_layers)
    student = copy.deepcopy(teacher)
    layers = encoder_layers(student)
    kept = torch.nn.ModuleList([layers[index] for index in chosen])
    student.base_model.encoder.layer = kept
    student.config.num_hidden_layers = student_layers
    return student, chosen


@dataclass(frozen=True)
class LayerParts:
    """The linear layers of one BERT-style encoder block that pruning resizes."""

    attention: torch.nn.Module
    query: torch.nn.Linear
    key: torch.nn.Linear
    value: torch.nn.Linear
    attention_output: torch.nn.Linear
    intermediate: torch.nn.Linear
    output: torch.nn.Linear


@dataclass(frozen=True)
class PruningPlan:
    """Kept head and neuron indices per encoder layer (indices into the unpruned layer)."""

    head_size: int
    heads: tuple[tuple[int, ...], ...]
    neurons: tuple[tuple[int, ...], ...]

    def to_dict(self) -> dict:
        return {"head_size": self.head_size, "heads": [list(h) for h in self.heads],
                "neurons": [list(n) for n in self.neurons]}

    @classmethod
    def from_dict(cls, data: dict) -> PruningPlan:
        return cls(int(data["head_size"]), tuple(tuple(h) for h in data["heads"]),
                   tuple(tuple(n) for n in data["neurons"]))


def layer_parts(layer: torch.nn.Module) -> LayerParts:
    try:
        attention = layer.attention.self
        return LayerParts(attention, attention.query, attention.key, attention.value, layer.attention.output.dense,
                          layer.intermediate.dense, layer.output.dense)
    except AttributeError:
        raise ConfigError(
            f"{type(layer).__name__} is not a BERT-style block (attention.self.query/key/value, "
            "attention.output.dense, intermediate.dense, output.dense): structured pruning supports BERT, "
            "MiniLM and RoBERTa encoders"
        ) from None


def head_size_of(model: torch.nn.Module) -> int:
    return model.config.hidden_size // model.config.num_attention_heads


def _select(linear: torch.nn.Linear, index: torch.Tensor, dim: int) -> torch.nn.Linear:
    """A new Linear with only the rows (dim 0, outputs) or columns (dim 1, inputs) in ``index``."""
    weight = linear.weight.detach().index_select(dim, index).clone()
    bias = linear.bias.detach().clone() if linear.bias is not None else None
    if dim == 0 and bias is not None:
        bias = bias.index_select(0, index).clone()
    resized = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    resized.weight = torch.nn.Parameter(weight)
    if bias is not None:
        resized.bias = torch.nn.Parameter(bias)
    return resized


def apply_plan(model: torch.nn.Module, plan: PruningPlan) -> None:
    """Resize every encoder block of ``model`` in place to the heads and neurons the plan keeps."""
    layers = encoder_layers(model)
    if len(layers) != len(plan.heads) or len(layers) != len(plan.neurons):
        raise ConfigError(f"pruning plan has {len(plan.heads)} layers, the model {len(layers)}")
    for layer, heads, neurons in zip(layers, plan.heads, plan.neurons):
        parts = layer_parts(layer)
        rows = torch.tensor([head * plan.head_size + offset for head in heads for offset in range(plan.head_size)])
        parts.attention.query = _select(parts.query, rows, 0)
        parts.attention.key = _select(parts.key, rows, 0)
        parts.attention.value = _select(parts.value, rows, 0)
        layer.attention.output.dense = _select(parts.attention_output, rows, 1)
        parts.attention.num_attention_heads = len(heads)
        parts.attention.all_head_size = len(heads) * plan.head_size
        kept = torch.tensor(neurons)
        layer.intermediate.dense = _select(parts.intermediate, kept, 0)
        layer.output.dense = _select(parts.output, kept, 1)


def load_pruned(model_dir: Path, attention: str = "eager") -> torch.nn.Module:
    """Rebuild a structurally pruned classifier saved by the pruning step and load its weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    plan = PruningPlan.from_dict(json.loads((model_dir / PLAN_FILENAME).read_text()))
    config = AutoConfig.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_config(config, attn_implementation=attention)
    apply_plan(model, plan)
    missing, unexpected = model.load_state_dict(load_file(str(model_dir / "model.safetensors")), strict=False)
    real_missing = [name for name in missing if not name.endswith("position_ids")]
    if real_missing or unexpected:
        raise ConfigError(f"pruned model in {model_dir} does not match its plan: missing {real_missing[:5]}, "
                          f"unexpected {unexpected[:5]}")
    return model.eval()


def build_tiny_model(target: Path, labels: tuple[str, ...] = ("negative", "positive"), seed: int = 0) -> Path:
    """Save a tiny random BERT classifier with a word-piece tokenizer into ``target``.

    No download: the vocabulary is trained on generated sentences. Used by tests and quick runs.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(TINY_WORDS) for _ in range(12)) for _ in range(200)]
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    backend.train_from_iterator(corpus, trainer)
    cls_id, sep_id = backend.token_to_id("[CLS]"), backend.token_to_id("[SEP]")
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=backend.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=512,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={name: index for index, name in enumerate(labels)},
    )
    model = BertForSequenceClassification(config)
    target.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def generate_texts(count: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Labelled sentences a tiny model can learn: label 1 when positive words outnumber negative ones."""
    positive, negative = set(TINY_WORDS[:10]), set(TINY_WORDS[10:20])
    neutral = TINY_WORDS[20:]
    rng = random.Random(seed)
    texts, labels = [], []
    for index in range(count):
        label = index % 2
        pool = list(positive if label else negative)
        words = [rng.choice(pool) for _ in range(3)] + [rng.choice(neutral) for _ in range(rng.randint(3, 12))]
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels
