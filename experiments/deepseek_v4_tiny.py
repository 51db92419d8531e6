"""deepseek_v4 at CPU size: DeepSeek-V4-Flash's layer pattern, routing and hyper-connections with
tiny widths (sliding, CSA and HCA layers; a hash-routed first layer), trained from scratch.

  python -m moejax.train --config experiments/deepseek_v4_tiny.py --workdir runs/v4_tiny
"""

from moejax.experiment import shrink_to_cpu, sibling


def get_config():
    return shrink_to_cpu(sibling(__file__, "deepseek_v4_flash").get_config())
