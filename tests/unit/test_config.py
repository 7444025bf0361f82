import pytest

from tasks.config import DataConfig, FinetuneConfig, GateConfig, PipelineConfig, PromoteConfig, QuantizeConfig
from tasks.errors import ConfigError
from tasks.pipeline import DEFAULT_PARAMS, config_from_params


def test_defaults_build_a_valid_config():
    config = config_from_params({})
    assert config.data.source == "demo:imdb"
    assert config.finetune.model == "demo:minilm"
    assert config.evaluate.max_length == config.finetune.max_length


def test_round_trip_through_plain_data():
    config = config_from_params({"max_train": 10, "overrides": {"quantize": {"per_channel": False}}})
    again = PipelineConfig.from_dict(config.to_dict())
    assert again == config
    assert again.quantize.per_channel is False


@pytest.mark.parametrize(
    "params, message",
    [
        ({"max_tran": 5}, "unknown params"),
        ({"epochs": 0}, "finetune.epochs"),
        ({"max_train": 1.5}, "must be an integer"),
        ({"max_train": True}, "must be an integer"),
        ({"learning_rate": "fast"}, "invalid value"),
        ({"max_relative_accuracy_drop": 1.5}, "gate.max_relative_accuracy_drop"),
        ({"triton_model": "bad name!"}, "promote.triton_model"),
        ({"overrides": {"quantize": {"per_chanel": True}}}, "unknown keys in quantize"),
        ({"overrides": {"nonsense": {}}}, "unknown config sections"),
        ({"overrides": {"quantize": {"per_channel": "yes"}}}, "true or false"),
        ({"quantize": "no"}, "quantize.enabled must be true or false"),
        ({"distill": False}, "prune needs distill: pruning works on the distilled student"),
        ({"distill": False, "overrides": {"prune": {"enabled": True}}}, "prune needs distill"),
        ({"train_precision": "fp16"}, "finetune.precision must be one of"),
        ({"overrides": {"prune": {"precision": "half"}}}, "prune.precision must be one of"),
        ({"truncation": "tail"}, "finetune.truncation must be one of"),
        ({"overrides": {"evaluate": {"truncation": "middle"}}}, "evaluate.truncation must be one of"),
    ],
)
def test_invalid_params_name_the_field(params, message):
    with pytest.raises(ConfigError, match=message):
        config_from_params(params)


def test_every_ui_param_has_a_default_and_a_target():
    from tasks.pipeline import PARAM_PATHS

    assert set(DEFAULT_PARAMS) == set(PARAM_PATHS)


def test_direct_construction_validates():
    with pytest.raises(ConfigError):
        DataConfig(source="")
    with pytest.raises(ConfigError):
        DataConfig(source="x.csv", labels=("a", "a"))
    with pytest.raises(ConfigError):
        FinetuneConfig(model="m", batch_size=0)
    with pytest.raises(ConfigError):
        PromoteConfig(alias="latest")
    with pytest.raises(ConfigError):
        GateConfig(min_source_agreement=2)


def test_quantize_presets_differ_where_the_cpu_does():
    assert QuantizeConfig.avx2().reduce_range is True
    assert QuantizeConfig.avx512_vnni().reduce_range is False


def _metrics(p50: float, accuracy: float) -> dict[str, float]:
    return {"latency_p50_ms": p50, "accuracy": accuracy}


def test_fastest_passing_candidate_wins():
    from tasks.decisions import choose_winner

    gated = {"a": (True, _metrics(9.0, 0.9)), "b": (True, _metrics(4.0, 0.8)), "c": (False, _metrics(1.0, 0.95))}
    assert choose_winner(gated) == "b"
    assert choose_winner({"a": (False, _metrics(9.0, 0.9)), "c": (False, _metrics(1.0, 0.9))}) is None
    assert choose_winner({}) is None


def test_a_reoptimization_promotes_the_most_accurate_passing_candidate_faster_of_equals():
    from tasks.decisions import choose_winner

    gated = {"a": (True, _metrics(9.0, 0.9)), "b": (True, _metrics(4.0, 0.8)), "c": (False, _metrics(1.0, 0.95)),
             "d": (True, _metrics(7.0, 0.9))}
    assert choose_winner(gated, "most_accurate") == "d"
    assert choose_winner({"c": (False, _metrics(1.0, 0.95))}, "most_accurate") is None


def test_no_winner_reason_names_budget_accuracy_and_the_fastest_candidate():
    from tasks.decisions import no_winner_reason

    config = GateConfig(max_relative_accuracy_drop=0.05, max_p95_latency_ms=40.0, latency_noise_margin=0.0)
    candidates = {"slow": {"latency_p95_ms": 80.0, "accuracy": 0.9}, "quick": {"latency_p95_ms": 52.0, "accuracy": 0.8}}
    assert no_winner_reason(config, candidates, teacher_score=0.9) == (
        "no candidate meets 40.0 ms p95 at >= 0.855 accuracy (and the other gates); the fastest was quick at "
        "52.0 ms p95 with accuracy 0.800")
    assert "ms p95 at" not in no_winner_reason(GateConfig(max_p95_latency_ms=0.0), candidates, 0.9)


def test_the_latency_gate_is_on_by_default_at_the_monitors_slo():
    from monitoring.policy import SLO_P95_MS, PolicyConfig

    assert GateConfig().max_p95_latency_ms == SLO_P95_MS == PolicyConfig().max_p95_ms
    assert config_from_params({}).gate.max_p95_latency_ms == SLO_P95_MS
    with pytest.raises(ConfigError):
        GateConfig(latency_noise_margin=0.95)


def test_distillation_follows_the_fine_tuning_settings_unless_overridden():
    config = config_from_params({"max_length": 64, "batch_size": 8, "student_layers": 2,
                                 "overrides": {"distill": {"batch_size": 4}}})
    assert config.distill.max_length == 64
    assert config.distill.batch_size == 4
    assert config.distill.student_layers == 2
    assert config.distill.epochs == 2.0


def test_techniques_are_switched_on_by_default_and_each_can_be_switched_off():
    config = config_from_params({})
    assert config.distill.enabled and config.prune.enabled and config.quantize.enabled
    config = config_from_params({"distill": False, "prune": False, "quantize": False})
    assert not (config.distill.enabled or config.prune.enabled or config.quantize.enabled)
    assert not config_from_params({"prune": False}).prune.enabled
    assert PipelineConfig.from_dict(config.to_dict()) == config


def test_pruning_without_distillation_is_rejected_when_the_config_is_built():
    from tasks.config import DistillConfig, PruneConfig

    with pytest.raises(ConfigError, match="Switch prune off as well"):
        PipelineConfig(data=DataConfig(source="x.csv"), finetune=FinetuneConfig(model="m"),
                       distill=DistillConfig(enabled=False), prune=PruneConfig(enabled=True))


def test_presets_are_named_starting_points_and_demo_is_the_forms_defaults():
    from tasks.config import preset

    assert preset("demo") == config_from_params({})
    tiny, full = preset("tiny", "x.csv", "m"), preset("full")
    assert tiny.data.source == "x.csv" and tiny.finetune.max_length == 32 and tiny.distill.student_layers == 1
    assert full.data.max_train == 0 and full.finetune.layer_learning_rates == (1e-5, 5e-5, 1e-4)
    assert preset("quick").data.max_train < config_from_params({}).data.max_train
    with pytest.raises(ConfigError, match="unknown preset"):
        preset("huge")


def test_the_dataclass_defaults_are_the_forms_defaults():
    from tasks.config import DistillConfig

    assert DataConfig(source="x").max_train == DEFAULT_PARAMS["max_train"] == 1000
    assert DistillConfig().epochs == DEFAULT_PARAMS["distill_epochs"] == 2.0


def test_the_serving_default_name_is_defined_once():
    from serving.model_repository import DEFAULT_MODEL
    from tasks.config import SERVED_MODEL

    assert PromoteConfig().triton_model == SERVED_MODEL == DEFAULT_MODEL


def test_layer_learning_rates_are_a_list_param_of_the_form():
    from tasks.params import form

    entry = form()["layer_learning_rates"]
    assert entry["type"] == "array" and entry["default"] == [] and entry["items"] == {"type": "number"}
    chosen = config_from_params({"layer_learning_rates": [1e-5, 5e-5, 1e-4]})
    assert chosen.finetune.layer_learning_rates == (1e-5, 5e-5, 1e-4)
    assert config_from_params({}).finetune.layer_learning_rates == ()
    with pytest.raises(ConfigError, match="three rates"):
        config_from_params({"layer_learning_rates": [1e-5, 1e-4]})
    with pytest.raises(ConfigError, match="list of numbers"):
        config_from_params({"layer_learning_rates": ["fast", "slow", "slower"]})


def test_training_precision_is_one_param_that_every_training_step_follows():
    from tasks.params import form

    assert form()["train_precision"]["enum"] == ["fp32", "bf16", "auto"]
    assert form()["train_precision"]["default"] == "fp32"
    config = config_from_params({"train_precision": "bf16", "overrides": {"prune": {"precision": "fp32"}}})
    assert (config.finetune.precision, config.distill.precision, config.sparsify.precision) == ("bf16",) * 3
    assert config.prune.precision == "fp32"


def test_truncation_is_one_param_that_every_step_tokenizing_for_a_model_follows():
    from tasks.params import form

    assert form()["truncation"]["enum"] == ["head", "head_tail"]
    assert form()["truncation"]["default"] == "head"
    config = config_from_params({"truncation": "head_tail", "overrides": {"sparsify": {"truncation": "head"}}})
    followers = (config.finetune, config.distill, config.prune, config.evaluate)
    assert [section.truncation for section in followers] == ["head_tail"] * 4
    assert config.sparsify.truncation == "head"
    assert config_from_params({}).evaluate.truncation == "head"
    from tasks.config import preset

    assert preset("full").evaluate.truncation == "head_tail"
