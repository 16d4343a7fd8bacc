"""Reading checkpoints safely and strictly: one copy for every model of the zoo.

    state = load_weights_only(file)                      # torch.load(weights_only=True): no code runs
    check_state_dict(model.state_dict(), state, where)   # every key present, none extra, every shape right
"""

from __future__ import annotations

from pathlib import Path

import torch

from sae_fast.errors import CheckpointError


def load_weights_only(file: str | Path):
    """`torch.load(file, weights_only=True)` on the CPU; anything that is not a weights-only pickle (a pickled
    class, a corrupt or foreign file) is a one-line CheckpointError naming the file."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling errors come in many types
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise CheckpointError(f"{file}: cannot be read as a weights-only PyTorch checkpoint "
                              f"({type(e).__name__}: {first[:200]}); only tensors, dicts, lists and numbers "
                              "are accepted") from None


def _first(keys: list[str]) -> str:
    return f"{keys[0]!r}" + (f" (+{len(keys) - 1} more)" if len(keys) > 1 else "")


def check_state_dict(expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor], where: str,
                     hint: str = "does the architecture match the checkpoint's config?") -> None:
    """Refuse `state` unless it has exactly the keys of `expected`, each with the same shape.

    One line naming the first offending key of each kind, e.g. "FILE: missing key 'a.weight' (+2 more);
    unexpected key 'b'; key 'c' has shape (3, 4), expected (4, 3); HINT"."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    problems = []
    if missing:
        problems.append(f"missing key {_first(missing)}")
    if unexpected:
        problems.append(f"unexpected key {_first(unexpected)}")
    if wrong:
        k = wrong[0]
        more = f" (+{len(wrong) - 1} more wrong shapes)" if len(wrong) > 1 else ""
        problems.append(f"key {k!r} has shape {tuple(state[k].shape)}, expected {tuple(expected[k].shape)}{more}")
    if problems:
        raise CheckpointError(f"{where}: {'; '.join(problems)}; {hint}")


__all__ = ["check_state_dict", "load_weights_only"]
