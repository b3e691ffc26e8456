"""Every shipped config loads; the CPU-sized synthetic ones also build their model."""

import pytest
from detectron2.modeling import build_model

from d2prune.config import check_prune_config, setup_cfg
from d2prune.criteria import available
from d2prune.errors import UserError

from .conftest import REPO

CONFIGS = sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))


def test_configs_found():
    assert len(CONFIGS) >= 8


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads(name):
    cfg = setup_cfg(str(REPO / name))
    # Only the configs under prune/ and study/ prune while training; they must pass the
    # training-time check once their criterion is registered (loading never requires it).
    assert cfg.PRUNE.ENABLED is ("/prune/" in name or "/study/" in name)
    if cfg.PRUNE.ENABLED and cfg.PRUNE.CRITERION in available():
        check_prune_config(cfg)
    if name.startswith("configs/synthetic/") and "Base-" not in name:
        model = build_model(cfg)
        num_params = sum(p.numel() for p in model.parameters())
        # R18-FPN with a 256-wide box head: about 13 M parameters, not R50's 41 M.
        assert 10e6 < num_params < 16e6
    if name.startswith("configs/examples/"):
        assert cfg.MODEL.WEIGHTS.startswith("detectron2://")
        assert cfg.MODEL.RESNETS.DEPTH == 50


def test_bad_config_and_options(tmp_path):
    with pytest.raises(UserError, match="nope.yaml: config file not found"):
        setup_cfg(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("MODEL:\n  NOT_A_KEY: 1\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown config key MODEL.NOT_A_KEY; see add_prune_config"):
        setup_cfg(str(bad))
    with pytest.raises(UserError, match=r"command-line override SOLVER.NOPE 3: unknown config key SOLVER.NOPE; see add_prune_config"):
        setup_cfg(str(REPO / "configs/synthetic/faster_rcnn_R18_FPN_source.yaml"), ["SOLVER.NOPE", "3"])
