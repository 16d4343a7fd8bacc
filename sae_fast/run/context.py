"""The two types of the stage plug-in contract (described in sae_fast/run/__init__.py): `Stage` and `Context`."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

from sae_fast import utils


@dataclasses.dataclass(frozen=True)
class Stage:
    """One step of a run. `run(ctx)` does the work and returns a JSON-able dict (or None) that is kept in
    state.json and log.jsonl and given to later stages as `ctx.results[name]`."""

    name: str
    run: Callable[[Context], dict | None]
    section: type | None = None  # its own optional config section [name]; absent from the TOML: stage skipped
    check: Callable[[Context], None] | None = None  # up-front checks, before the run folder is touched
    summary: Callable[[Context], list[str]] | None = None  # its block of summary.txt, read from its files
    when: Callable[[Any], bool] | None = None  # when(config) -> False skips the stage (e.g. extract if fused)

    def active(self, config) -> bool:
        if self.section is not None and getattr(config, self.name) is None:
            return False
        return self.when is None or bool(self.when(config))


@dataclasses.dataclass
class Context:
    """What a stage receives: the resolved config, the run folder, the loaded model and cells, the SAE, and the
    results of the stages before it."""

    config: Any  # sae_fast.run.config.RunConfig; config.<name> is the stage's own section
    folder: Any  # sae_fast.run.folder.RunFolder
    model: Any  # the loaded ScFM (sae_fast.load_model), on its device
    adata: Any  # the cells (AnnData, raw counts in X, genes as in the file)
    train_cells: Any = None  # int array: rows of adata the SAE trains on (all but the held-out cells)
    heldout_cells: Any = None  # int array: rows of adata held out of training ([data] holdout), for evaluation
    results: dict = dataclasses.field(default_factory=dict)  # stage name -> what its run() returned
    title: str | None = None  # the summary's title line (the demo sets one)
    started: float = dataclasses.field(default_factory=time.perf_counter)  # this invocation's start
    _sae: Any = None

    @property
    def sae(self):
        """The SAE: [run] sae when given, else the one training wrote to sae/ (loaded on first use)."""
        if self._sae is None:
            from sae_fast import load_sae

            self._sae = load_sae(self.folder.sae)
        return self._sae

    @sae.setter
    def sae(self, value) -> None:
        self._sae = value

    say = staticmethod(utils.say)  # a progress line on stdout (silent under -q)
