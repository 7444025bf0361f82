import pytest

from monitoring.errors import MonitoringConfigError
from monitoring.pipeline import retrain_conf

# optimize_model's params as the DAG passes them (tasks.pipeline's PARAM_PATHS and RUN_PARAMS, TRIGGER_PARAMS).
KNOWN = ("data_source", "max_train", "force_retrain", "trigger_reason", "trigger_kind", "trigger_evidence")
RESERVED = ("trigger_reason", "trigger_kind", "trigger_evidence")


def test_retrain_conf_accepts_optimize_params_as_json_or_mapping():
    assert retrain_conf("", KNOWN, RESERVED) == {} and retrain_conf(None, KNOWN, RESERVED) == {}
    assert retrain_conf('{"data_source": "/data/labelled", "max_train": 300}', KNOWN, RESERVED) == {
        "data_source": "/data/labelled", "max_train": 300}
    assert retrain_conf({"force_retrain": True}, KNOWN, RESERVED) == {"force_retrain": True}


@pytest.mark.parametrize(("value", "message"), [
    ("{not json", "not valid JSON"),
    ('["data_source"]', "JSON object"),
    ('{"data_sorce": "/x"}', "unknown optimize_model params \\['data_sorce'\\]; known: \\['data_source', "),
    ('{"trigger_reason": "mine"}', "the monitor fills them in"),
    ('{"trigger_kind": "drift", "data_source": "/d"}', "may not set \\['trigger_kind'\\]"),
])
def test_retrain_conf_rejects_what_optimize_model_would_reject(value, message):
    with pytest.raises(MonitoringConfigError, match=message):
        retrain_conf(value, KNOWN, RESERVED)


def test_retrain_conf_checks_against_the_real_optimize_model_params():
    from tasks.pipeline import PARAM_PATHS, RUN_PARAMS, TRIGGER_PARAMS

    known = (*PARAM_PATHS, *RUN_PARAMS)
    assert retrain_conf('{"data_source": "/d", "force_retrain": true}', known, TRIGGER_PARAMS)["force_retrain"]
    assert "trigger_kind" in known and "trigger_kind" in TRIGGER_PARAMS
    for name in TRIGGER_PARAMS:
        with pytest.raises(MonitoringConfigError, match="fills them in"):
            retrain_conf({name: ""}, known, TRIGGER_PARAMS)
