"""`--replica-id` / `STREAMDIFF_REPLICA_ID`: the session-id prefix nginx routes on."""

import pytest

from server.settings import parse_settings


def test_replica_id_from_flag_or_environment():
    assert parse_settings([], environ={}).replica_id == ""
    assert parse_settings([], environ={"STREAMDIFF_REPLICA_ID": "g0"}).replica_id == "g0"
    assert parse_settings(["--replica-id", "r2"], environ={"STREAMDIFF_REPLICA_ID": "g0"}).replica_id == "r2"


@pytest.mark.parametrize("bad", ["R1", "r-1", "a/b", "x" * 17])
def test_replica_id_must_be_a_safe_prefix(bad, capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--replica-id", bad], environ={})
    assert "replica_id" in capsys.readouterr().err
