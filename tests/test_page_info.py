"""What the page shows before an upload, without a browser: the metadata route's "flower" info and /readyz."""

from __future__ import annotations

import json
import shutil

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from testkit.artifacts import CLASSES, make_ensemble

CV = {"folds": 5, "seed": 0, "blend": {"macro_f1": 0.8419, "macro_f1_std": 0.0315, "log_loss": float("nan")},
      "members": {"m32": {"macro_f1": 0.807, "macro_f1_std": 0.03}, "m48": {"macro_f1": 0.7606, "macro_f1_std": 0.01}},
      "fold_macro_f1": [0.81, float("nan"), 0.86]}  # a list (none is written today): its numbers pass, NaN is null


@pytest.fixture(scope="module")
def ensemble_dir(tmp_path_factory):
    ens = make_ensemble(tmp_path_factory.mktemp("page_info"))
    document = json.loads((ens / "ensemble.json").read_text())
    (ens / "ensemble.json").write_text(json.dumps({**document, "cv": CV}))  # NaN as ensemble.json may hold it
    return ens


def _info(settings: Settings) -> tuple[dict, dict]:
    """The default model's metadata "flower" object and the /readyz body."""
    with TestClient(create_app(settings)) as client:
        ready = client.get("/readyz").json()
        return client.get(f"/v1/models/{ready['default_model']}/metadata").json()["flower"], ready


def test_the_metadata_carries_the_cross_validated_f1_and_readyz_the_default_model(ensemble_dir):
    info, ready = _info(Settings(ensemble=str(ensemble_dir), model_name="daisies"))
    assert ready["default_model"] == "daisies" and ready["models"] == {"daisies": {"1": "AVAILABLE"}}
    assert info["cv"]["blend"]["macro_f1"] == 0.8419 and info["cv"]["blend"]["macro_f1_std"] == 0.0315
    assert info["cv"]["blend"]["log_loss"] is None  # not a number: null, so that the answer is valid JSON
    assert info["cv"]["folds"] == 5 and info["cv"]["members"]["m48"]["macro_f1"] == 0.7606
    assert info["cv"]["fold_macro_f1"] == [0.81, None, 0.86]
    assert [(m["name"], m["image_size"], m["weight"]) for m in info["members"]] == [("m32", 32, 0.3), ("m48", 48, 0.7)]
    assert info["blend"] == "weighted" and info["tta"] == 1 and info["classes"] == CLASSES


def test_a_run_served_alone_has_no_cv_but_its_validation_f1(ensemble_dir, tmp_path):
    run = shutil.copytree(ensemble_dir.parent / "runs" / "m32", tmp_path / "m32")
    member = json.loads((run / "member.json").read_text())
    (run / "member.json").write_text(json.dumps({**member, "metrics": {"val_macro_f1": 0.6543}}))
    info, ready = _info(Settings(run=str(run)))
    assert ready["default_model"] == "flowers"
    assert info["cv"] is None and [m["val_macro_f1"] for m in info["members"]] == [0.6543]
