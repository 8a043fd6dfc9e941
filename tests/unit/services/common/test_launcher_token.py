"""`crescent up` gives every service of a run one internal token: a fresh random one, or the environment's."""

from __future__ import annotations

from crescent.services.common.launcher import plan_local_cluster


def _plan():
    return plan_local_cluster("/models/m", "m", gateway_port=18000, free_ports=True)


def test_each_run_gets_its_own_random_token(monkeypatch):
    monkeypatch.delenv("CRESCENT_INTERNAL_TOKEN", raising=False)
    monkeypatch.delenv("CRESCENT_INTERNAL_TOKEN_FILE", raising=False)
    first, second = _plan(), _plan()
    assert len(first.internal_token) >= 32 and first.internal_token != second.internal_token
    assert first.child_env() == {"CRESCENT_INTERNAL_TOKEN": first.internal_token, "CRESCENT_INTERNAL_TOKEN_FILE": ""}
    assert all(first.internal_token not in " ".join(p.argv) for p in first.processes)  # never on a command line


def test_a_token_set_in_the_environment_is_used(monkeypatch, tmp_path):
    monkeypatch.setenv("CRESCENT_INTERNAL_TOKEN", "operator-chosen")
    assert _plan().internal_token == "operator-chosen"
    monkeypatch.delenv("CRESCENT_INTERNAL_TOKEN")
    (tmp_path / "token").write_text("from-a-file\n")
    monkeypatch.setenv("CRESCENT_INTERNAL_TOKEN_FILE", str(tmp_path / "token"))
    plan = _plan()  # the file is read once here; children get the value and no file (both would be refused)
    assert plan.child_env() == {"CRESCENT_INTERNAL_TOKEN": "from-a-file", "CRESCENT_INTERNAL_TOKEN_FILE": ""}
