"""The served model: a `center_embed.runtime.OnnxModel` plus its centers as numpy.

Images go through the runtime chosen (onnxruntime or OpenVINO) for their embeddings; the
distances, nearest center, min distance and unknown flag of every answer are computed in
numpy from those embeddings against a `CentersSnapshot` (the contract's formula for
the model's distance kind, which the warm-up checks against the graph's own outputs).

The snapshot is the model file's classes plus what was enrolled (center_embed/enrolment.py,
persisted in the centers file beside the model). It is immutable and replaced by one
attribute assignment: a request takes it once, when it starts (`current_centers`), and
answers from it to the end, so an enrolment never tears a request's answer. Each
`current_centers` costs one os.stat of the centers file and reloads it when another worker
(--workers N) changed it; `change_centers` holds the file's lock around read-modify-write.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from center_embed.contract import center_scores, read_centers
from center_embed.enrolment import CenterSet, CentersFile, CentersSnapshot
from center_embed.errors import UserError
from center_embed.fileio import sha256_file
from center_embed.runtime import OnnxModel, RuntimeOptions, describe

WARMUP_SEED = 0
log = logging.getLogger("center_embed.service")


class ServedModel:
    """What the app needs of a model; tests may wrap `run` (e.g. to hold a batch back)."""

    def __init__(self, model: OnnxModel, centers: np.ndarray, sha256: str) -> None:
        self.model = model
        self.info = model.info
        self.output_names = model.output_names  # the file's: four, or five with atypicality
        self.centers = centers  # (C, D) float32: the file's own, which the graph uses
        self.sha256 = sha256
        if centers.shape != (self.info.num_classes, self.info.embedding_dim):
            raise ValueError(
                f"centers have shape {centers.shape}; metadata says "
                f"({self.info.num_classes}, {self.info.embedding_dim})"
            )
        self.base_centers = CenterSet.from_model(self.info, centers, sha256)
        self.store: CentersFile | None = None
        self._failure: tuple[Any, str] | None = None  # (a bad file's signature, why refused)
        # (snapshot, the centers file's signature it was read at): replaced as one value
        self._state: tuple[CentersSnapshot, Any] = (
            CentersSnapshot.of(self.base_centers, self.info),
            None,
        )

    @classmethod
    def open(
        cls,
        path: str | Path,
        options: RuntimeOptions | None = None,
    ) -> ServedModel:
        path = Path(path)
        # No spinning: the server's own threads (decoding, HTTP) need the cores between runs.
        model = OnnxModel(path, options, spinning=False)
        return cls(model, read_centers(path), sha256_file(path))

    @property
    def provider(self) -> str:
        return self.model.provider

    @property
    def runtime(self) -> dict[str, Any]:
        """Runtime, precision, device, threads, and why they were chosen (/v1/model)."""
        return self.model.runtime

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 (N, H, W, 3) -> embeddings, distances, labels, min_distances, atypicality."""
        return self.model.run(images)

    # ------------------------------------------------------------------ the centers

    def use_centers_file(self, path: str | Path) -> None:
        """Serve the centers persisted at `path` (when it exists), and persist enrolments
        there. A file that is not a valid centers file of this model is a one-line UserError
        here, at start (naming the file by its name only, as every message of a server does:
        its folders are none of a client's business)."""
        path = Path(path)
        self.store = CentersFile(path, self.sha256, self.info, name=path.name)
        self._state = (self._state[0], object())  # unlike any signature: read at first use
        self._failure = None
        self.current_centers()

    def current_centers(self) -> CentersSnapshot:
        """The snapshot a request starting now answers with (reloaded when the file changed).

        When the file is replaced by one that is not a valid centers file of this model
        (unreadable, odd meta, NaN centers or thresholds, another model's, ...), the last good
        snapshot is kept but not answered with: every call raises the UserError naming the
        file by its name (the routes that need the centers answer 503 centers_unavailable),
        logged once per bad version of the file, until a valid file (or none) replaces it.
        Serving the last snapshot instead would answer with classes that may no longer be the
        file's. The bad file is read once, not once per request (its signature is kept)."""
        snapshot, seen = self._state
        if self.store is None:
            return snapshot
        signature = self.store.signature()
        if signature == seen:
            return snapshot
        failure = self._failure
        if failure is not None and failure[0] == signature:
            raise UserError(failure[1])  # a new one: a re-raised one would grow its traceback
        try:
            stored = self.store.read() or self.base_centers  # no file: the model's own
        except UserError as e:
            log.warning("centers file refused; answering 503 until it is fixed: %s", e)
            self._failure = (signature, str(e))
            raise
        snapshot = CentersSnapshot.of(stored, self.info)
        self._state, self._failure = (snapshot, signature), None
        return snapshot

    def change_centers(self, change: Callable[[CenterSet], CenterSet]) -> CentersSnapshot:
        """Apply `change` to the latest centers under the file's lock, persist, and swap the
        snapshot in; returns it. A refused change (EnrolmentError) changes nothing. Blocking
        (a file lock and an fsync): run it in a thread."""
        if self.store is None:
            raise UserError("no centers file: enrolment needs one beside the model")
        with self.store.locked():
            current = self.store.read() or self.base_centers
            changed = change(current)
            self.store.write(changed)
            snapshot = CentersSnapshot.of(changed, self.info)
            self._state = (snapshot, self.store.signature())
        return snapshot

    def distances(
        self, embeddings: np.ndarray, centers: CentersSnapshot | None = None
    ) -> dict[str, np.ndarray]:
        """float32 (N, D) -> distances (N, C), labels, min_distances, unknown_scores (N,)
        against `centers` (default: the current snapshot); a bare vector has no atypicality."""
        return (centers or self.current_centers()).scores(embeddings)

    def unknown(
        self, outputs: dict[str, np.ndarray], centers: CentersSnapshot | None = None
    ) -> np.ndarray:
        """True where an image's unknown score exceeds its nearest class's threshold."""
        return (centers or self.current_centers()).unknown(outputs)

    def file_distances(
        self, embeddings: np.ndarray, atypicality: np.ndarray | None = None
    ) -> dict[str, np.ndarray]:
        """The same against the model file's own centers: what the graph computes."""
        info = self.info
        return center_scores(
            embeddings, self.centers, info.score_kind, info.true_distances, atypicality
        )

    def warm_up(self, batch_sizes: tuple[int, ...] = (1, 8)) -> None:
        """Run the graph once per batch size, and check that the centers read from the file
        give the graph's own distances and unknown scores (so /v1/distances agrees with
        /v1/classify, less the image's atypicality, which a bare embedding does not carry)."""
        h, w = self.info.input_size
        rng = np.random.default_rng(WARMUP_SEED)
        for n in batch_sizes:
            images = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
            out = self.run(images)
            if not all(np.isfinite(v).all() for v in out.values()):
                raise RuntimeError("the model gave non-finite outputs at warm-up")
        ours = self.file_distances(out["embeddings"], out["atypicality"])
        for name in ("distances", "unknown_scores"):
            scale = max(1.0, float(np.abs(out[name]).max()))
            error = float(np.abs(ours[name] - out[name]).max()) / scale
            if error > 1e-3:
                raise RuntimeError(
                    f"{name} from the file's centers differ from the graph's by {error:.2e} "
                    "(relative): the centers initializer is not what the graph uses"
                )

    def summary(self, centers: CentersSnapshot | None = None) -> dict[str, Any]:
        """The short description every classify / distances answer carries."""
        centers = centers or self.current_centers()
        return {
            "sha256": self.sha256,
            "precision": self.info.precision,
            "embedding_dim": self.info.embedding_dim,
            "num_classes": len(centers.names),
            "centers_version": centers.version,
            "unknown_threshold": self.info.unknown_threshold,
            "provider": self.provider,
        }

    def metadata(self) -> dict[str, Any]:
        return describe(self.info)
