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
    params = set(re.findall(r'^\s+"(\w+)": Param\(', (ROOT / "dags" / "monitor_serving.py").read_text(), re.M))
    documented = set(re.findall(r"`(\w+)`", (ROOT / "docs" / "dags" / "monitor_serving.md").read_text()))
    assert len(params) >= 7 and params <= documented, f"monitor_serving: {sorted(params - documented)}"


def test_the_optimize_model_params_table_is_the_generated_one():
    from tasks.params import form, markdown_table

    page = (ROOT / "docs" / "dags" / "optimize_model.md").read_text()
    table = page.split("<!-- params:begin -->\n")[1].split("<!-- params:end -->")[0]
    assert table == markdown_table(), "run `python -m tasks.params` and paste its table into docs/dags/optimize_model.md"
    assert len(form()) >= 20 and all(f"| `{name}` |" in table for name in form())
