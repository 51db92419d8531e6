"""qwen3_moe_30b_a3b at CPU size: the same architecture family and routing rules, tiny widths."""

from moejax.experiment import shrink_to_cpu, sibling


def get_config():
    return shrink_to_cpu(sibling(__file__, "qwen3_moe_30b_a3b").get_config())
