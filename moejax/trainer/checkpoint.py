"""Orbax checkpoints of the whole run: train state, data iterator position and resolved config.

Saves are asynchronous; Orbax writes each step to a temporary directory and renames it when
finished, so an interrupted save never looks complete and the previous one stays the latest.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from moejax.config import Config, ModelConfig, upgrade_saved


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
        saved = upgrade_saved(saved)
        mine = self.cfg.to_dict()
        # a field newer than the checkpoint compares as its default (what the run that saved it had)
        defaults = _flat(ModelConfig().to_dict())
        saved_model = _flat(saved["model"])
        diffs = [
            f"model.{k}: checkpoint {saved_model.get(k, defaults[k])!r} vs config {v!r}"
            for k, v in _flat(mine["model"]).items()
            if saved_model.get(k, defaults[k]) != v
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

    def check_layout(self, step: int, abstract_state) -> None:
        """The checkpoint's parameters and router biases are the ones this code builds: one from a
        moejax whose parameter paths differ (a module renamed or moved) is refused naming the
        paths, not left to fail inside Orbax. (The optimizer state mirrors the parameters.)"""
        from absl import logging as absl_logging

        verbosity = absl_logging.get_verbosity()
        absl_logging.set_verbosity(absl_logging.ERROR)  # no per-item metadata file: expected here
        try:
            with ocp.StandardCheckpointer() as c:
                saved = c.metadata(os.path.join(self.dir, str(step), "state")).item_metadata
        except (FileNotFoundError, ValueError):  # no readable metadata: Orbax checks on restore
            return
        finally:
            absl_logging.set_verbosity(verbosity)
        if saved is None:  # Orbax could not read it (it logs why): it checks again on restore
            return

        def paths(tree):
            out = set()
            for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
                names = [str(getattr(k, "key", getattr(k, "name", k))) for k in p]
                if names and names[0] != "opt_state":
                    out.add("/".join(n for n in names if n != "value"))
            return out

        want, have = paths(abstract_state), paths(saved)
        if want != have:
            missing, extra = sorted(want - have), sorted(have - want)
            raise IncompatibleCheckpoint(
                f"{self.dir} holds a checkpoint (step {step}) whose arrays do not match this "
                f"model's: missing {missing[:3]}{' ...' if len(missing) > 3 else ''}, unexpected "
                f"{extra[:3]}{' ...' if len(extra) > 3 else ''} (written by another version of "
                "moejax?). Use a new --workdir, or the moejax that wrote it."
            )

    def restore(self, step: int, abstract_state):
        self.check_layout(step, abstract_state)
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


def _flat(d: dict, prefix: str = "") -> dict:
    """{'router': {'n_group': 2}} -> {'router.n_group': 2}."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out
