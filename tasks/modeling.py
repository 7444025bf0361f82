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
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from tasks.errors import ConfigError
from tasks.families import EncoderFamily, family_of, unsupported_reason

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


def _resolve(root: torch.nn.Module, path: str) -> torch.nn.Module:
    """The submodule at a dotted ``path`` (list indices as digits: ``albert_layer_groups.0``)."""
    module = root
    for name in path.split("."):
        module = getattr(module, name)
    return module


def _replace(root: torch.nn.Module, path: str, module: torch.nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(_resolve(root, parent) if parent else root, name, module)


def encoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The transformer blocks of the model's encoder, where its family keeps them (``tasks.families``);
    for a family that shares one block across its depth (ALBERT), the unique blocks."""
    family = family_of(model.config)
    try:
        layers = _resolve(model.base_model, family.layers)
    except AttributeError:
        layers = None
    if not isinstance(layers, torch.nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} ({family.name}) has no <base>.{family.layers} list of blocks; "
                          "was it built by a transformers version with another module layout?")
    return layers


def encoder_depth(model: torch.nn.Module) -> int:
    """How many transformer blocks an input passes through (a shared block counts once per application)."""
    if family_of(model.config).shared_layers:
        return int(model.config.num_hidden_layers)
    return len(encoder_layers(model))


def unsupported_family(source: str | Path) -> str | None:
    """Why the model in ``source`` (a folder or hub id) is no encoder family that distillation and
    structured pruning support (None: it is one), read from its config alone."""
    from transformers import AutoConfig

    return unsupported_reason(AutoConfig.from_pretrained(str(source)))


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
    """A copy of ``teacher`` keeping only the mapped encoder layers (embeddings, pooler and head kept).

    A family with one shared block (ALBERT) keeps that block and applies it ``student_layers`` times.
    """
    family = family_of(teacher.config)
    chosen = student_layer_map(encoder_depth(teacher), student_layers)
    student = copy.deepcopy(teacher)
    if not family.shared_layers:
        layers = encoder_layers(student)
        _replace(student.base_model, family.layers, torch.nn.ModuleList([layers[index] for index in chosen]))
    student.config.num_hidden_layers = student_layers
    return student, chosen


@dataclass(frozen=True)
class LayerParts:
    """The linear layers of one encoder block that pruning resizes (``intermediate``/``output``: the FFN's in and out)."""

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


def layer_parts(layer: torch.nn.Module, family: EncoderFamily) -> LayerParts:
    """The linear layers of one block of ``family`` that structured pruning resizes."""
    try:
        attention = _resolve(layer, family.attention)
        return LayerParts(attention, _resolve(attention, family.query), _resolve(attention, family.key),
                          _resolve(attention, family.value), _resolve(layer, family.attention_output),
                          _resolve(layer, family.ffn_in), _resolve(layer, family.ffn_out))
    except AttributeError:
        raise ConfigError(
            f"{type(layer).__name__} lacks the {family.name} modules ({family.attention}.{family.query}/"
            f"{family.key}/{family.value}, {family.attention_output}, {family.ffn_in}, {family.ffn_out}) that "
            "structured pruning resizes; see tasks/families.py"
        ) from None


def block_parts(model: torch.nn.Module) -> list[LayerParts]:
    """``layer_parts`` of every (unique) encoder block of ``model``."""
    family = family_of(model.config)
    return [layer_parts(layer, family) for layer in encoder_layers(model)]


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
    family = family_of(model.config)
    layers = encoder_layers(model)
    if len(layers) != len(plan.heads) or len(layers) != len(plan.neurons):
        raise ConfigError(f"pruning plan has {len(plan.heads)} layers, the model {len(layers)}")
    for layer, heads, neurons in zip(layers, plan.heads, plan.neurons):
        parts = layer_parts(layer, family)
        rows = torch.tensor([head * plan.head_size + offset for head in heads for offset in range(plan.head_size)])
        for path, linear in ((family.query, parts.query), (family.key, parts.key), (family.value, parts.value)):
            _replace(parts.attention, path, _select(linear, rows, 0))
        _replace(layer, family.attention_output, _select(parts.attention_output, rows, 1))
        for name in family.head_count:
            setattr(parts.attention, name, len(heads))
        for name in family.head_width:
            setattr(parts.attention, name, len(heads) * plan.head_size)
        kept = torch.tensor(neurons)
        _replace(layer, family.ffn_in, _select(parts.intermediate, kept, 0))
        _replace(layer, family.ffn_out, _select(parts.output, kept, 1))


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


TINY_FAMILIES = ("bert", "distilbert", "roberta", "electra", "xlm-roberta", "albert")
# Special tokens in each family's order (the pad id matters: RoBERTa's position ids count from it).
_WORDPIECE_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_ROBERTA_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
_ALBERT_SPECIALS = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]


def _tiny_backend(family: str, corpus: list[str]):
    """A ``tokenizers.Tokenizer`` of the family's kind trained on ``corpus``: word-piece (BERT, DistilBERT,
    ELECTRA), byte-level BPE (RoBERTa) or SentencePiece-style Unigram (XLM-RoBERTa, ALBERT)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if family == "roberta":
        backend = Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.train_from_iterator(corpus, trainers.BpeTrainer(
            vocab_size=400, special_tokens=_ROBERTA_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        backend.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
        return backend
    if family in ("xlm-roberta", "albert"):
        specials = _ROBERTA_SPECIALS if family == "xlm-roberta" else _ALBERT_SPECIALS
        backend = Tokenizer(models.Unigram(_unigram_vocab(specials, corpus), unk_id=specials.index("<unk>")))
        if family == "albert":
            backend.normalizer = normalizers.Lowercase()
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
        cls, sep = ("<s>", "</s>") if family == "xlm-roberta" else ("[CLS]", "[SEP]")
        backend.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B {sep}",
            special_tokens=[(cls, backend.token_to_id(cls)), (sep, backend.token_to_id(sep))])
        return backend
    backend = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.train_from_iterator(corpus, trainers.WordPieceTrainer(vocab_size=200, special_tokens=_WORDPIECE_SPECIALS))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", backend.token_to_id("[CLS]")), ("[SEP]", backend.token_to_id("[SEP]"))])
    return backend


def _unigram_vocab(specials: list[str], corpus: list[str]) -> list[tuple[str, float]]:
    """A SentencePiece-style Unigram vocabulary: the specials, every corpus word as one ``▁word`` piece
    (log-probability by count) and single characters as the fallback. Written out rather than trained:
    the Unigram trainer prunes a 200-sentence corpus down to characters."""
    import math
    from collections import Counter

    words = Counter(word for text in corpus for word in text.split())
    total = sum(words.values())
    pieces = [(token, 0.0) for token in specials]
    pieces += [(f"\u2581{word}", math.log(count / total)) for word, count in sorted(words.items())]
    characters = sorted({character for word in words for character in word} | {"\u2581"})
    return pieces + [(character, -20.0) for character in characters]


def _tiny_tokenizer(family: str, backend) -> PreTrainedTokenizerBase:
    from transformers import PreTrainedTokenizerFast

    if family in ("roberta", "xlm-roberta"):
        names = dict(bos_token="<s>", eos_token="</s>", cls_token="<s>", sep_token="</s>", unk_token="<unk>",
                     pad_token="<pad>", mask_token="<mask>")
    elif family == "albert":
        names = dict(cls_token="[CLS]", sep_token="[SEP]", unk_token="<unk>", pad_token="<pad>", mask_token="[MASK]")
    else:
        names = dict(cls_token="[CLS]", sep_token="[SEP]", unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]")
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=512, **names)


def _tiny_config(family: str, vocab_size: int, pad_id: int, labels: tuple[str, ...]):
    """Two layers of two heads, hidden size 32, FFN 64 (ELECTRA and ALBERT with 16-wide embeddings)."""
    from transformers import AutoConfig

    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)
    extra: dict = {"max_position_embeddings": 512}
    if family == "distilbert":
        shape = dict(dim=32, n_layers=2, n_heads=2, hidden_dim=64)
    elif family in ("roberta", "xlm-roberta"):  # positions start after the pad id, as in the released models
        extra = {"max_position_embeddings": 514, "type_vocab_size": 1, "bos_token_id": 0, "eos_token_id": 2}
    elif family in ("electra", "albert"):
        extra["embedding_size"] = 16
    return AutoConfig.for_model(family, vocab_size=vocab_size, pad_token_id=pad_id, num_labels=len(labels),
                                id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)},
                                **shape, **extra)


def build_tiny_model(target: Path, labels: tuple[str, ...] = ("negative", "positive"), seed: int = 0,
                     family: str = "bert") -> Path:
    """Save a tiny random classifier of ``family`` (a ``model_type`` in ``TINY_FAMILIES``) with a tokenizer
    of that family's kind into ``target``.

    No download: the vocabulary is trained on generated sentences. Used by tests and quick runs.
    """
    if family not in TINY_FAMILIES:
        raise ConfigError(f"no tiny {family!r} model; families: {', '.join(TINY_FAMILIES)}")
    rng = random.Random(seed)
    corpus = [" ".join(rng.choice(TINY_WORDS) for _ in range(12)) for _ in range(200)]
    backend = _tiny_backend(family, corpus)
    tokenizer = _tiny_tokenizer(family, backend)
    torch.manual_seed(seed)
    config = _tiny_config(family, backend.get_vocab_size(), tokenizer.pad_token_id, labels)
    model = AutoModelForSequenceClassification.from_config(config)
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
