"""Orbax checkpoints of the whole run: train state, data iterator position and resolved config.

Saves are asynchronous; Orbax writes each step to a temporary directory and renames it when
finished, so an interrupted save never looks complete and the previous one stays the latest.
"""

from __future__ import annotations

import os

import orbax.checkpoint as ocp

from moejax.config import Config, ModelConfig


class IncompatibleCheckpoint(ValueError):
    pass


class Checkpointer:
    def __init__(self, workdir: str, cfg: Config):
        self.dir = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.cfg = cfg
        options = ocp.CheckpointManagerOptions(
            max_to_keep=cfg.train.keep_checkpoints, create=True, enable_async_checkpointing=True
        )
        self.manager = ocp.CheckpointManager(
            self.dir, options=options, item_names=("state", "data", "config")
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
        """Saves the state without the base's own weights (LoRA's frozen base, DPO's reference): a
        resumed run reads them from the base again."""
        state = {k: v for k, v in state.items() if k not in ("frozen", "reference")}
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                data=ocp.args.JsonSave(data_state),
                config=ocp.args.JsonSave(self.cfg.to_dict()),
            ),
            force=force,
        )

    def check_compatible(self, step: int) -> None:
        saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ]
        mine = self.cfg.to_dict()
        # a field newer than the checkpoint compares as its default (what the run that saved it had)
        defaults = ModelConfig().to_dict()
        saved_model = {k: saved["model"].get(k, defaults[k]) for k in mine["model"]}
        diffs = [
            f"model.{k}: checkpoint {saved_model[k]!r} vs config {v!r}"
            for k, v in mine["model"].items()
            if saved_model[k] != v
        ]
        for section, keys in (
            ("data", ("seq_len", "source")),
            ("train", ("batch_size", "seed")),
            ("lora", ("rank", "alpha", "targets")),
            ("align", ("method",)),
        ):
            if section not in saved:  # a checkpoint from before the section existed: its defaults
                saved[section] = dict(self.cfg.to_dict()[section], rank=0, method="")
            diffs += [
                f"{section}.{k}: checkpoint {saved[section].get(k)!r} vs config "
                f"{mine[section][k]!r}"
                for k in keys
                if saved[section].get(k) != mine[section][k]
            ]
        if saved.get("base", "") != mine["base"]:
            diffs.append(f"base: checkpoint {saved.get('base', '')!r} vs config {mine['base']!r}")
        if diffs:
            raise IncompatibleCheckpoint(
                f"{self.dir} holds a checkpoint (step {step}) from an incompatible config: "
                + "; ".join(diffs[:6])
                + ". Use a new --workdir, or the original config."
            )

    def restore(self, step: int, abstract_state):
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            ),
        )
        return out["state"], out["data"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.wait_until_finished()
        self.manager.close()
