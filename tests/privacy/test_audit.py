from __future__ import annotations

import stat

from potluck.privacy.audit import AuditLog, AuditRecord


def test_append_read_and_mode(tmp_path):
    log = AuditLog.in_data_dir(tmp_path / "d")
    log.append(AuditRecord("cloud/m", 3, "standard", "sanitize", {"PERSON": 2}, "ab" * 32, 40))
    log.append(AuditRecord("peer/x", 2, "off", "raw", {}, "cd" * 32, 10))
    assert stat.S_IMODE(log.path.stat().st_mode) == 0o600
    recs = list(log.records())
    assert [r.destination for r in recs] == ["cloud/m", "peer/x"]
    assert recs[0].entities == {"PERSON": 2} and recs[0].time.endswith("+00:00")


def test_malformed_lines_skipped(tmp_path, caplog):
    log = AuditLog(tmp_path / "a.jsonl")
    log.append(AuditRecord("cloud/m", 3, "standard", "sanitize", {}, "0" * 64, 1))
    with log.path.open("a") as fh:
        fh.write("{not json\n" + '{"destination": 1}\n')
    assert len(list(log.records())) == 1
    assert "skipped" in caplog.text


def test_missing_file_is_empty(tmp_path):
    assert list(AuditLog(tmp_path / "none.jsonl").records()) == []
