"""The published-version watcher: explicit polls, a fake validator, real published checkpoints."""

from __future__ import annotations

import logging
import shutil
from types import SimpleNamespace

import pytest

from crescent.models.published import published_versions, versioned_model_id
from crescent.services.common.model_watch import ModelWatcher, first_version, watcher_for
from tests.unit.services.common.helpers import FakeValidate, make_versions


def test_versions_sorted_numerically_and_temp_folders_ignored(tmp_path):
    make_versions(tmp_path, "v000200", "v1000000", "v000010", ".v000300.tmp-123", "notes")
    (tmp_path / "v000400").write_text("a file, not a version")
    assert [p.name for p in published_versions(tmp_path)] == ["v000010", "v000200", "v1000000"]
    assert published_versions(tmp_path / "missing") == []


def test_poll_serves_newest_then_only_newer(tmp_path):
    make_versions(tmp_path, "v000100", "v000200")
    watcher = ModelWatcher(tmp_path, "tiny", validate=FakeValidate())
    assert watcher.model_id == "tiny" and watcher.version == ""
    first = watcher.poll()
    assert first == tmp_path / "v000200"
    watcher.accept(first)
    assert watcher.model_id == versioned_model_id("tiny", "v000200") == "tiny@v000200"
    assert watcher.poll() is None  # v000100 is older: never a candidate
    make_versions(tmp_path, "v000300")
    assert watcher.poll() == tmp_path / "v000300"
    assert watcher.version == "v000200"  # poll alone changes nothing: the caller accepts after loading


def test_broken_version_refused_once_with_one_log_line(tmp_path, caplog):
    make_versions(tmp_path, "v000001", "v000002", "v000003")
    validate = FakeValidate("v000003")
    watcher = ModelWatcher(tmp_path, "tiny", validate=validate)
    watcher.accept(tmp_path / "v000001")
    with caplog.at_level(logging.ERROR, logger="crescent.services.common.model_watch"):
        assert watcher.poll() == tmp_path / "v000002"  # the newest is broken: the next valid one is served
        watcher.accept(tmp_path / "v000002")
        for _ in range(5):
            assert watcher.poll() is None
    assert validate.calls["v000003"] == 1  # remembered, not re-validated every poll
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "v000003" in lines[0] and "sha256" in lines[0] and "v000001" in lines[0]
    reason = str(tmp_path / "v000003" / "model.safetensors") + " does not match its sha256"
    assert watcher.describe() == {"version": "v000002", "versions": ["v000002", "v000001"],
                                  "refused_versions": {"v000003": reason}}


def test_refusing_a_version_that_does_not_load(tmp_path):
    (v1,) = make_versions(tmp_path, "v000001")
    watcher = ModelWatcher(tmp_path, validate=FakeValidate())
    watcher.refuse(v1, "does not load: RuntimeError: size mismatch")
    watcher.refuse(v1, "again")  # the first reason stays
    assert watcher.refused == {"v000001": "does not load: RuntimeError: size mismatch"}
    with pytest.raises(ValueError, match="no valid published version.*size mismatch"):
        first_version(watcher)


def test_watcher_for_plain_and_published_folders(tmp_path):
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text("{}")
    assert watcher_for(str(plain)) is None and watcher_for("default") is None
    assert watcher_for(str(tmp_path / "missing")) is None
    make_versions(tmp_path / "pub", "v000001")
    assert watcher_for(str(tmp_path / "pub")).name == "pub"
    assert watcher_for(str(tmp_path / "pub"), "served").name == "served"


def test_real_checkpoints_validated_and_resolved(tmp_path):
    """With publish_checkpoint and validate_checkpoint: a corrupt newest version is refused by its sha256."""
    from crescent.models.prepare import prepare_model
    from crescent.training.pretrain import build_model, model_config
    from crescent.training.publish import publish_checkpoint
    from crescent.training.settings import ModelShapeSettings
    from crescent.training.tokenizer import IM_END, special_id, train_tokenizer

    tok = train_tokenizer(["hello world, the moon is bright"] * 10, vocab_size=280)
    shape = ModelShapeSettings(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1,
                               moba_block_size=8, moba_topk=2, full_layers=[0])
    config = model_config(shape, tok.get_vocab_size(), 64, special_id(tok, IM_END))
    model = build_model(config, seed=0, device="cpu")
    good = publish_checkpoint(model, config, tok, tmp_path, "m", step=1, metrics={})
    bad = publish_checkpoint(model, config, tok, tmp_path / "staging", "m", step=2, metrics={})
    with (bad / "model.safetensors").open("r+b") as f:  # flip bytes past the header: sha256 no longer matches
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    shutil.move(str(bad), str(tmp_path / "m" / "v000002"))
    watcher = ModelWatcher(tmp_path / "m")
    assert watcher.poll() == good
    assert "sha256" in watcher.refused["v000002"]
    assert prepare_model(tmp_path / "m") == good
    from crescent.cli import _resolve_model  # `crescent up --model DIR` serves (and watches) the DIR

    args = SimpleNamespace(tiny=False, model=str(tmp_path / "m"), served_model_name="")
    assert _resolve_model(args) == (str((tmp_path / "m").resolve()), "m")
