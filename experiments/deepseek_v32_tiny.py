"""deepseek_v32 at CPU size: DeepSeek-V3's tiny shape with DeepSeek Sparse Attention (each query
keeps its indexer's top 32 of up to 128 keys), trained from scratch in the sparse stage. V3.2's
own recipe (new indexers on a trained dense base, warmed up alone, then sparse training) is
`python -m benchmarks.dsa_stages` at this size.

  python -m moejax.train --config experiments/deepseek_v32_tiny.py --workdir runs/v32_tiny
"""

from moejax.experiment import shrink_to_cpu, sibling


def get_config():
    return shrink_to_cpu(sibling(__file__, "deepseek_v32").get_config())
