"""deepseek_moe_16b at CPU size: the same architecture family and routing rules, tiny widths."""

from moejax.experiment import shrink_to_cpu, sibling


def get_config():
    c = shrink_to_cpu(sibling(__file__, "deepseek_moe_16b").get_config())
    c.model.num_kv_heads = (
        c.model.num_heads
    )  # multi-head attention, as the full model (and its 'deepseek' export)
    return c
