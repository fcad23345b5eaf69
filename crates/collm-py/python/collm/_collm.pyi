"""Type stubs of the extension module under the `collm` package (crates/collm-py/src/lib.rs)."""

from typing import Any, Callable, Optional, Sequence, Tuple

import numpy as np
import numpy.typing as npt

__version__: str

_Progress = Optional[Callable[[str, int, int, Optional[str]], Any]]

class Recommender:
    def __init__(self, run: str, data: Optional[str] = None) -> None: ...
    @property
    def kind(self) -> str: ...
    @property
    def run(self) -> str: ...
    @property
    def max_user(self) -> int: ...
    @property
    def max_item(self) -> int: ...
    def title(self, item: int) -> str: ...
    def _score(
        self,
        users: npt.NDArray[np.int64],
        items: npt.NDArray[np.int64],
        progress: _Progress = None,
    ) -> npt.NDArray[np.float64]: ...
    def rank(
        self,
        user: Optional[int] = None,
        history: Optional[Sequence[int]] = None,
        k: int = 10,
        candidates: Optional[Sequence[int]] = None,
        progress: _Progress = None,
    ) -> list[dict[str, Any]]: ...
    def evaluate(self, split: str = "valid", scores: bool = False, progress: _Progress = None) -> Any: ...

def _train_cf(
    data: str, out: str, config_json: str, resume: bool = False, force: bool = False, progress: _Progress = None
) -> dict: ...
def _cf_config_json(path: str) -> str: ...
def _train(
    config: Optional[str],
    config_json: Optional[str],
    out: str,
    resume: bool = False,
    force: bool = False,
    progress: _Progress = None,
) -> dict: ...
def _prepare(source: str, out: str, options_json: str, force: bool = False, progress: _Progress = None) -> dict: ...
def report(
    runs: Sequence[str],
    data: Optional[str] = None,
    split: str = "valid",
    out: Optional[str] = None,
    rescore: bool = False,
    progress: _Progress = None,
) -> str: ...
def _auc(labels: npt.NDArray[np.uint8], scores: npt.NDArray[np.float64]) -> Optional[float]: ...
def _uauc(
    labels: npt.NDArray[np.uint8], scores: npt.NDArray[np.float64], users: npt.NDArray[np.int64]
) -> Tuple[Optional[float], int]: ...
def _subsets(data: str, split: str, scores: npt.NDArray[np.float64]) -> dict: ...
def _split_columns(data: str, split: str) -> dict[str, np.ndarray]: ...
def _write_tiny_backbone(dir: str, seed: int = 1) -> None: ...
def _flush_denormals(flush: bool) -> bool: ...
