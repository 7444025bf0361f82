"""Load classifiers and tokenizers from local folders or hub ids, and build tiny random ones for tests."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertConfig, BertForSequenceClassification
from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
    plan_path = Path(str(source)) / "pruning_plan.json"
    if plan_path.is_file():
        from tasks.prune import load_pruned

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
