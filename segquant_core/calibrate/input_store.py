"""Where the recorded block inputs of all calibration samples wait: on the device within a byte budget,
in safetensors files beyond it.

Block-sequential calibration holds, between two units, the inputs of the next unit for every sample.
At real size these outgrow memory (SD3.5-medium at 1024², 256 samples: ≈7 GB bf16), so once the resident
bytes pass ``budget_bytes`` a sample's input storages are written to a safetensors file in a temporary
folder and their memory released (``storage.resize_(0)``); just before that sample runs the unit, the
bytes are read back into the *same* storages, so every tensor and view the model's forward still holds
sees its data again. Storages shared between samples or owned by the model (parameters, buffers) are
never spilled, nor are the calibration calls' own tensors (a call moved to the model's device may be the
very tensor the caller holds).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

logger = logging.getLogger(__name__)


def _storages(value: Any, out: dict[int, torch.UntypedStorage]) -> None:
    if isinstance(value, torch.Tensor):
        st = value.untyped_storage()
        if st.nbytes():
            out.setdefault(st.data_ptr(), st)
    elif isinstance(value, dict):
        for v in value.values():
            _storages(v, out)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _storages(v, out)


def _bytes_view(storage: torch.UntypedStorage) -> torch.Tensor:
    return torch.empty(0, dtype=torch.uint8, device=storage.device).set_(storage)


@dataclass
class _Held:
    storages: dict[int, torch.UntypedStorage]
    spilled: list[tuple[torch.UntypedStorage, int]] = field(default_factory=list)  # (storage, nbytes)
    file: Path | None = None


class InputStore:
    """Accounts for (and spills) the unit inputs each paused calibration sample holds."""

    def __init__(
        self, budget_bytes: int, model: nn.Module, protected: Any = (), spill_dir: str | Path | None = None
    ) -> None:
        self.budget_bytes = budget_bytes
        self._spill_root = spill_dir
        self._dir: Path | None = None
        self._held: dict[int, _Held] = {}
        self._owners: dict[int, set[int]] = {}  # storage data_ptr → samples holding it
        kept: dict[int, torch.UntypedStorage] = {}
        _storages((list(model.parameters()), list(model.buffers()), protected), kept)
        self._protected = set(kept)
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.spilled_bytes = 0  # in total, over the whole calibration

    def _account(self) -> None:
        self.resident_bytes = sum(st.nbytes() for st in self._unique().values())
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    def _unique(self) -> dict[int, torch.UntypedStorage]:
        out: dict[int, torch.UntypedStorage] = {}
        for held in self._held.values():
            out.update(held.storages)
        return out

    def hold(self, sample: int, args: tuple, kwargs: dict[str, Any]) -> None:
        """Record that ``sample`` waits with these inputs; spill them if the budget is exceeded."""
        self.release(sample)
        found: dict[int, torch.UntypedStorage] = {}
        _storages((args, kwargs), found)
        found = {p: st for p, st in found.items() if p not in self._protected}
        self._held[sample] = _Held(found)
        for p in found:
            self._owners.setdefault(p, set()).add(sample)
        self._account()
        if self.resident_bytes > self.budget_bytes:
            self._spill(sample)

    def _spill(self, sample: int) -> None:
        held = self._held[sample]
        own = {p: st for p, st in held.storages.items() if self._owners.get(p) == {sample}}
        if not own:
            return
        if self._dir is None:
            self._dir = Path(tempfile.mkdtemp(prefix="segquant-calibration-", dir=self._spill_root))
        path = self._dir / f"sample-{sample}.safetensors"
        save_file({f"s{i}": _bytes_view(st).cpu() for i, st in enumerate(own.values())}, str(path))
        for st in own.values():
            held.spilled.append((st, st.nbytes()))
            self.spilled_bytes += st.nbytes()
            st.resize_(0)
        held.storages = {p: st for p, st in held.storages.items() if p not in own}
        for p in own:
            self._owners.pop(p, None)
        held.file = path
        self._account()

    def restore(self, sample: int) -> None:
        """Bring ``sample``'s spilled inputs back into their storages (before it runs the unit)."""
        held = self._held.get(sample)
        if held is None or held.file is None:
            return
        data = load_file(str(held.file))
        for i, (st, nbytes) in enumerate(held.spilled):
            st.resize_(nbytes)
            _bytes_view(st).copy_(data[f"s{i}"])
        del data
        held.file.unlink()
        held.file, held.spilled = None, []

    def release(self, sample: int) -> None:
        """``sample`` no longer waits on these inputs (it is running the unit or has finished)."""
        held = self._held.pop(sample, None)
        if held is None:
            return
        for p in held.storages:
            owners = self._owners.get(p)
            if owners is not None:
                owners.discard(sample)
                if not owners:
                    del self._owners[p]
        self._account()

    def close(self) -> None:
        """Delete the spill folder (also after a failure)."""
        self._held.clear()
        self._owners.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None


def default_budget_bytes(device: torch.device) -> int:
    """Half of the device's free memory (CUDA) or of the host's available memory (CPU)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free // 2
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024 // 2
    except OSError as e:
        logger.warning("cannot read /proc/meminfo (%s); block-input budget defaults to 4 GiB", e)
    return 4 << 30


__all__ = ["InputStore", "default_budget_bytes"]
