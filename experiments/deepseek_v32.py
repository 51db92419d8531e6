"""DeepSeek-V3.2 (V3.2-Exp: 671B + 0.85B of indexers, 37B activated): DeepSeek-V3 with DeepSeek
Sparse Attention, every MLA layer's lightning indexer keeping the top 2048 keys per query
(config.json of deepseek-ai/DeepSeek-V3.2-Exp: index_topk 2048, index_n_heads 64,
index_head_dim 128).

Training follows the V3.2 report: from a dense V3 base, new indexers and a dense warm-up that
trains only them on their KL loss (model.dsa_stage='warmup'), then sparse training of everything
(model.dsa_stage='sparse', the default):

  python -m moejax.finetune --config experiments/continual.py --config.base=<a dense V3 base> \\
      --config.model.index_topk=2048 --config.model.index_n_heads=64 \\
      --config.model.index_head_dim=128 --config.model.dsa_stage=warmup --workdir runs/v32_warmup
  python -m moejax.finetune --config experiments/continual.py --config.base=runs/v32_warmup ...
"""

from moejax.experiment import sibling


def model_overrides(m):
    sibling(__file__, "deepseek_v3").model_overrides(m)
    m.index_topk = 2048
    m.index_n_heads = 64
    m.index_head_dim = 128


def get_config():
    c = sibling(__file__, "deepseek_v3").get_config()
    model_overrides(c.model)
    return c
