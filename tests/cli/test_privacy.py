from __future__ import annotations

import json

from typer.testing import CliRunner

from potluck.cli import app
from potluck.privacy.audit import AuditLog, AuditRecord

runner = CliRunner()


def test_redact_jsonl_contract():
    lines = [
        json.dumps({"text": "Mail jane.roe@mail.example.com or call +1 (415) 555-0132."}),
        json.dumps({"text": "nothing here"}),
        "{broken",
        json.dumps({"txt": 1}),
    ]
    res = runner.invoke(app, ["privacy", "redact", "--jsonl"], input="\n".join(lines) + "\n")
    assert res.exit_code == 1  # two bad lines, reported, the others still answered
    out = [json.loads(line) for line in res.stdout.splitlines() if line.startswith("{")]
    first, second, bad1, bad2 = out
    assert set(first) == {"text", "sanitized", "entities", "restored"}
    assert first["restored"] == first["text"]
    assert [e["type"] for e in first["entities"]] == ["EMAIL_ADDRESS", "PHONE_NUMBER"]
    for e in first["entities"]:
        assert e["placeholder"] in first["sanitized"] and first["text"][e["start"] : e["end"]] not in first["sanitized"]
    assert second["sanitized"] == "nothing here" and second["entities"] == []
    assert bad1["line"] == 3 and bad2["line"] == 4 and "error" in bad1


def test_redact_plain_stdin():
    res = runner.invoke(app, ["privacy", "redact"], input="token: ghp_16C7e42F292c6912E7710c838347Ae178B4a\n")
    assert res.exit_code == 0
    obj = json.loads(res.stdout)
    assert "ghp_" not in obj["sanitized"] and obj["restored"] == obj["text"]


def test_audit_table_and_json(tmp_path):
    AuditLog.in_data_dir(tmp_path).append(AuditRecord("cloud/m", 3, "standard", "sanitize", {"PERSON": 1}, "f" * 64, 9))
    res = runner.invoke(app, ["privacy", "audit", "--json", "--data-dir", str(tmp_path)])
    assert res.exit_code == 0 and json.loads(res.stdout)["entities"] == {"PERSON": 1}
    res = runner.invoke(app, ["privacy", "audit", "--data-dir", str(tmp_path)])
    assert res.exit_code == 0 and "cloud/m" in res.stdout
