"""Head and head+tail truncation: the pure rule (serving/truncation.py) and the HF helper (tasks/tokens.py)."""

import numpy as np
import pytest

from serving.truncation import TRUNCATIONS, kept_positions
from tasks import modeling
from tasks.modeling import TINY_FAMILIES, load_tokenizer
from tasks.tokens import encode

# [CLS] 20 body tokens [SEP]: 22 positions.
LONG_MASK = [1] + [0] * 20 + [1]


def test_a_text_that_fits_is_kept_whole_by_every_strategy():
    for strategy in TRUNCATIONS:
        assert kept_positions([1, 0, 0, 0, 1], 5, strategy) == [0, 1, 2, 3, 4]
        assert kept_positions([1, 0, 1], 128, strategy) == [0, 1, 2]


def test_head_keeps_the_specials_and_the_first_body_tokens():
    assert kept_positions(LONG_MASK, 10, "head") == [0, 1, 2, 3, 4, 5, 6, 7, 8, 21]


def test_head_tail_keeps_a_quarter_of_the_budget_from_the_start_and_the_rest_from_the_end():
    kept = kept_positions(LONG_MASK, 10, "head_tail")  # budget 8: 2 from the head, 6 from the tail
    assert kept == [0, 1, 2, 15, 16, 17, 18, 19, 20, 21]
    assert kept == sorted(kept) and len(kept) == 10


def test_head_tail_with_a_budget_under_four_keeps_only_the_tail():
    assert kept_positions(LONG_MASK, 5, "head_tail") == [0, 18, 19, 20, 21]  # budget 3: 0 + 3


def test_several_special_tokens_at_each_end_are_all_kept():
    mask = [1, 1] + [0] * 30 + [1, 1]  # e.g. a pair template's leading and closing tokens
    kept = kept_positions(mask, 12, "head_tail")  # budget 8: 2 + 6
    assert kept == [0, 1, 2, 3, 26, 27, 28, 29, 30, 31, 32, 33]


def test_an_unknown_strategy_is_refused_with_the_names():
    with pytest.raises(ValueError, match=r"truncation must be one of \['head', 'head_tail'\], got 'tail'"):
        kept_positions(LONG_MASK, 10, "tail")
    with pytest.raises(ValueError, match="truncation must be one of"):
        encode(None, ["x"], 8, "middle")


def _long_texts() -> list[str]:
    texts, _ = modeling.generate_texts(6, seed=3)
    return [" ".join(texts[:5]) + " the verdict at the very end", texts[5], "short"]


@pytest.fixture(scope="module", params=TINY_FAMILIES)
def family_tokenizer(request, tmp_path_factory):
    return load_tokenizer(modeling.build_tiny_model(tmp_path_factory.mktemp("tok") / request.param,
                                                    family=request.param))


def test_head_is_the_tokenizers_own_truncation_byte_for_byte(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    texts = _long_texts()
    for padding in (True, "max_length"):
        ours = encode(tokenizer, texts, 24, "head", padding=padding, return_tensors="np")
        theirs = tokenizer(texts, truncation=True, max_length=24, padding=padding, return_tensors="np",
                           return_token_type_ids=False)
        assert set(ours) == set(theirs) == {"input_ids", "attention_mask"}
        for key in theirs:
            np.testing.assert_array_equal(ours[key], theirs[key])


def test_kept_positions_head_reproduces_the_tokenizers_truncation_in_every_family(family_tokenizer):
    """The rule the served tokenizer applies equals the HF truncation the models were trained with."""
    texts = _long_texts()
    full = family_tokenizer(texts, return_special_tokens_mask=True, verbose=False)
    cut = family_tokenizer(texts, truncation=True, max_length=24)
    for ids, mask, expected in zip(full["input_ids"], full["special_tokens_mask"], cut["input_ids"]):
        assert [ids[position] for position in kept_positions(mask, 24, "head")] == expected


def test_head_tail_keeps_the_last_tokens_of_a_long_text(family_tokenizer):
    texts = _long_texts()
    full = family_tokenizer(texts, return_token_type_ids=True, verbose=False)
    batch = encode(family_tokenizer, texts, 24, "head_tail", return_tensors=None, return_token_type_ids=True)
    long_ids, long_full = batch["input_ids"][0], full["input_ids"][0]
    assert len(long_full) > 24 and len(long_ids) == 24
    body = 24 - 2  # every tiny family wraps a text in one leading and one trailing special token
    head = body // 4
    assert long_ids[:1 + head] == long_full[:1 + head]
    assert long_ids[1 + head:] == long_full[-(body - head) - 1:]
    assert batch["token_type_ids"][0] == full["token_type_ids"][0][:24]
    assert batch["attention_mask"][0] == [1] * 24
    short = len(full["input_ids"][2])  # a short text is untouched and padded to the longest
    assert batch["input_ids"][2][:short] == full["input_ids"][2]
    assert batch["attention_mask"][2] == [1] * short + [0] * (24 - short)
    assert batch["input_ids"][2][short:] == [family_tokenizer.pad_token_id] * (24 - short)


def test_head_tail_pads_to_max_length_for_calibration(tiny_model):
    tokenizer = load_tokenizer(tiny_model)
    batch = encode(tokenizer, ["short", _long_texts()[0]], 32, "head_tail", padding="max_length", return_tensors="np")
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (2, 32)
    assert batch["attention_mask"][1].sum() == 32


def test_the_steps_tokenize_with_the_runs_strategy(tiny_model):
    """Evaluation inputs, PyTorch logits and static INT8 calibration feeds all cut a long text by the strategy."""
    import torch

    from tasks.evaluate import tokenize
    from tasks.modeling import load_classifier
    from tasks.quantize import TextCalibrationReader
    from tasks.training import predict_logits

    tokenizer, model = load_tokenizer(tiny_model), load_classifier(tiny_model).eval()
    text = _long_texts()[0]
    head, tail = (tokenize(tokenizer, [text], 24, strategy) for strategy in TRUNCATIONS)
    assert head["input_ids"].tolist() != tail["input_ids"].tolist()
    np.testing.assert_array_equal(tail["input_ids"], encode(tokenizer, [text], 24, "head_tail")["input_ids"])
    with torch.no_grad():
        expected = model(**{key: torch.from_numpy(value) for key, value in tail.items()}).logits.numpy()
    np.testing.assert_allclose(predict_logits(model, tokenizer, [text], 24, truncation="head_tail"), expected,
                               atol=1e-6)
    feed = TextCalibrationReader(tokenizer, [text, "short"], 24, "head_tail")
    np.testing.assert_array_equal(feed.get_next()["input_ids"], tail["input_ids"])
    assert feed.get_next()["attention_mask"].shape == (1, 24)  # padded to max_length, as calibration needs


def test_export_checks_and_records_the_runs_strategy(tiny_model, prepared_data, tmp_path):
    import json

    from tasks import export
    from tasks.config import ExportConfig

    result = export.run(ExportConfig(), tiny_model, prepared_data, tmp_path / "onnx", max_length=16,
                        truncation="head_tail")
    assert result.metrics["max_abs_diff"] < 1e-4
    assert json.loads((tmp_path / "onnx" / "export_config.json").read_text())["truncation"] == "head_tail"
