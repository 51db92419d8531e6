"""Long-context extension stages (DeepSeek-V3 report §4.3): a base trained at a short length
continues at a longer one with its rotary embedding made YaRN (`extend` config section)."""

from __future__ import annotations

import pytest

from moejax import train
from moejax.config import ConfigError, ExtendConfig, ModelConfig
from moejax.experiment import resolve
from moejax.finetune import runner
from tests.helpers import tiny_config_dict


def test_extend_makes_the_rope_yarn_and_refuses_bad_settings(tmp_path):
    m = ModelConfig()
    out = ExtendConfig(rope_factor=4.0).apply(m, trained_length=256)
    assert out.rope_type == "yarn" and out.rope_factor == 4.0
    assert out.rope_original_max_position_embeddings == 256
    assert out.max_position_embeddings >= 1024 and out.rope_mscale_all_dim == 1.0
    # a base that has YaRN already keeps its original length (V3's 32K -> 128K stage)
    v3 = out.replace(rope_factor=40.0, rope_original_max_position_embeddings=4096)
    assert ExtendConfig(rope_factor=40.0).apply(v3).rope_original_max_position_embeddings == 4096
    assert ExtendConfig().apply(m) is m  # off
    with pytest.raises(ConfigError, match="extend.original_length"):
        ExtendConfig(rope_factor=4.0).apply(m)  # no YaRN and no known training length
    with pytest.raises(ConfigError, match="extend.rope_factor"):
        ExtendConfig(rope_factor=0.5)
    with pytest.raises(ConfigError, match="extend.beta_fast"):
        ExtendConfig(rope_factor=4.0, beta_fast=1.0, beta_slow=2.0)
    cd = tiny_config_dict()
    cd.extend.rope_factor = 4.0
    with pytest.raises(ConfigError, match="base: a long-context extension"):
        runner.resolve(resolve(cd))
    with pytest.raises(train.TrainingError, match="extend.rope_factor"):
        train.run(resolve(cd), str(tmp_path / "run"), quiet=True)


@pytest.mark.slow
def test_an_extension_stage_lowers_the_loss_at_the_long_length(corpus_cache, tmp_path):
    """Base: 60 steps at 64 tokens. Stage: 30 steps at 256 tokens with YaRN x4 from the base's
    weights. The validation loss at 256 tokens falls from the base's."""
    cd = tiny_config_dict(corpus_cache)
    cd.train.steps, cd.train.ckpt_every = 60, 60
    cd.optim.lr = 3e-3
    base = str(tmp_path / "base")
    train.run(resolve(cd), base, quiet=True)

    cd = tiny_config_dict(corpus_cache)
    cd.base = base
    cd.extend.rope_factor = 4.0
    cd.data.seq_len = 256
    cd.train.steps, cd.train.ckpt_every, cd.train.eval_batches = 30, 30, 2
    cd.optim.lr = 1e-3
    cfg = runner.resolve(resolve(cd))
    m = cfg.model
    assert m.rope_type == "yarn" and m.rope_factor == 4.0
    assert m.rope_original_max_position_embeddings == 64  # the base run's data.seq_len
    out = runner.run(cfg, str(tmp_path / "extended"), quiet=True)
    (v,) = out["forgetting"].values()
    print(f"validation loss at 256 tokens: base {v['base']:.3f}, extended {v['after']:.3f}")
    assert v["after"] < v["base"] - 0.05, v
