"""The run folder: state.json (which stages are done, and the config they ran), log.jsonl, environment.json,
config.resolved.toml, and the stages' files, each written under a temporary name and renamed."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from sae_fast import utils
from sae_fast.errors import UserError


class RunFolder:
    """A run's folder. Stages write through it: `write_table`, `write_json`, `write_text` (all under tables/,
    atomic) and `log` (one JSON line in log.jsonl); `shards` and `sae` are the extraction's and the trainer's
    folders."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.state_path = self.path / "state.json"
        self.log_path = self.path / "log.jsonl"
        self.tables = self.path / "tables"
        self.shards = self.path / "shards"
        self.sae = self.path / "sae"

    # -- state and log
    def state(self) -> dict:
        return json.loads(self.state_path.read_text()) if self.state_path.exists() else {}

    def done(self, stage: str) -> dict | None:
        """What a finished stage returned (with its seconds), or None if it has not finished."""
        return self.state().get("done", {}).get(stage)

    def mark_done(self, stage: str, seconds: float, **info) -> None:
        state = self.state()
        state.setdefault("done", {})[stage] = {"seconds": round(seconds, 3), **info}
        utils.write_json(self.state_path, state)

    def log(self, event: str, **fields) -> None:
        with open(self.log_path, "a") as f:
            f.write(utils.json_text({"time": round(time.time(), 3), "event": event, **fields}) + "\n")

    # -- the stages' files (tables/NAME...)
    def write_table(self, name: str, df) -> Path:
        """tables/NAME.parquet (CSV without pyarrow), atomically; returns the path."""
        return utils.write_table(self.tables / name, df)

    def read_table(self, name: str):
        return utils.read_table(self.tables / name)

    def write_json(self, name: str, obj) -> Path:
        path = self.tables / f"{name}.json"
        utils.write_json(path, obj)
        return path

    def read_json(self, name: str):
        return json.loads((self.tables / f"{name}.json").read_text())

    def write_text(self, name: str, text: str) -> Path:
        path = self.tables / name
        with utils.atomic_path(path) as tmp:
            tmp.write_text(text)
        return path

    # -- opening
    def open(self, config, force: bool) -> bool:
        """Create the folder, or reopen it for a resume (refusing a different config). True when resuming."""
        from sae_fast.run.config import to_toml

        if force and self.path.exists():
            if any(self.path.iterdir()) and not self.state_path.exists():
                raise UserError(f"{self.path}: not a sae-fast run folder (no state.json); refusing to delete "
                                "it with --force: choose another --out")
            shutil.rmtree(self.path)
        if self.path.exists() and any(self.path.iterdir()):
            if not self.state_path.exists():
                raise UserError(f"{self.path}: exists and is not a sae-fast run folder (no state.json); "
                                "choose another --out")
            old = self.state().get("config") or {}
            new = json.loads(json.dumps(config.to_dict()))
            if old != new:
                diff = [f"{s}.{k}: {old.get(s, {}).get(k)!r} -> {v!r}" for s, sec in new.items()
                        for k, v in sec.items() if old.get(s, {}).get(k) != v]
                diff += [f"[{s}] removed" for s in old if s not in new]
                raise UserError(f"{self.path}: holds a run of a different config ({'; '.join(diff[:3])}); "
                                "pass --force to start it fresh, or choose another --out")
            resuming = True
        else:
            self.path.mkdir(parents=True, exist_ok=True)
            utils.write_json(self.state_path, {"config": config.to_dict(), "done": {}})
            resuming = False
        if not (self.path / "config.resolved.toml").exists():  # (also after a kill right after state.json)
            with utils.atomic_path(self.path / "config.resolved.toml") as tmp:
                tmp.write_text(to_toml(config))
        if not (self.path / "environment.json").exists():
            utils.write_json(self.path / "environment.json", environment())
        return resuming


def environment() -> dict:
    """The machine and the versions of the libraries that shape the numbers."""
    from importlib import metadata

    env = utils.machine_description()
    versions = {}
    for pkg in ["sae-fast", "torch", "triton", "numpy", "scipy", "numba", "anndata", "scanpy", "gseapy",
                "scikit-learn", "pandas", "safetensors"]:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    env["packages"] = versions
    try:
        import torch

        from sae_fast import ops

        env["ops_backend_cpu"] = ops.backend_for(torch.zeros(1))
    except Exception:  # the environment is informative: a failing probe must not stop the run
        pass
    return env
