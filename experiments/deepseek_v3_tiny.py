"""deepseek_v3 at CPU size: the same architecture family and routing rules, tiny widths."""

from moejax.experiment import shrink_to_cpu, sibling


def get_config():
    return shrink_to_cpu(sibling(__file__, "deepseek_v3").get_config())
