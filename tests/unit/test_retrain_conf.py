import pytest

from monitoring.pipeline import retrain_conf
from tasks.errors import ConfigError


def test_retrain_conf_accepts_optimize_params_as_json_or_mapping():
    assert retrain_conf("") == {} and retrain_conf(None) == {}
    assert retrain_conf('{"data_source": "/data/labelled", "max_train": 300}') == {
        "data_source": "/data/labelled", "max_train": 300}
    assert retrain_conf({"force_retrain": True}) == {"force_retrain": True}


@pytest.mark.parametrize(("value", "message"), [
    ("{not json", "not valid JSON"),
    ('["data_source"]', "JSON object"),
    ('{"data_sorce": "/x"}', "unknown optimize_model params \\['data_sorce'\\]"),
    ('{"trigger_reason": "mine"}', "the monitor fills them in"),
])
def test_retrain_conf_rejects_what_optimize_model_would_reject(value, message):
    with pytest.raises(ConfigError, match=message):
        retrain_conf(value)
