"""The docs name what the code reads: every environment variable, every gateway setting."""

import re
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_every_environment_variable_the_code_reads_is_in_the_configuration_reference():
    code = "\n".join(path.read_text() for folder in ("tasks", "serving", "monitoring", "opsctl", "dags")
                     for path in (ROOT / folder).rglob("*.py"))
    read = set(re.findall(r"[\"'](PIPELINE_[A-Z_]+)[\"']", code))
    from serving.gateway import GatewaySettings

    read |= {f"GATEWAY_{field.name.upper()}" for field in fields(GatewaySettings)}
    documented = set(re.findall(r"`((?:PIPELINE|GATEWAY)_[A-Z_]+)`", (ROOT / "docs" / "configuration.md").read_text()))
    assert len(read) > 20
    assert read <= documented, f"not in docs/configuration.md: {sorted(read - documented)}"


def test_every_dag_param_is_on_its_dag_page():
    for dag_id in ("optimize_model", "monitor_serving"):
        params = set(re.findall(r'^\s+"(\w+)": Param\(', (ROOT / "dags" / f"{dag_id}.py").read_text(), re.M))
        page = (ROOT / "docs" / "dags" / f"{dag_id}.md").read_text()
        documented = set(re.findall(r"`(\w+)`", page))
        assert len(params) >= 7 and params <= documented, f"{dag_id}: {sorted(params - documented)}"
