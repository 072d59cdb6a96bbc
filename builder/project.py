"""Where one project's inputs and outputs live: everything is found beside its matrix file.

Built from the matrix *path*, so `-f other.yaml` selects a whole project (its templates/,
images/, runtime/ and build/), not just another list of targets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGES_README = "README.md"


@dataclass(frozen=True)
class Project:
    matrix: Path

    @classmethod
    def at(cls, root: Path) -> Project:
        """The project whose matrix is `root/matrix.yaml`."""
        return cls(root / "matrix.yaml")

    @property
    def root(self) -> Path:
        return self.matrix.parent

    @property
    def templates(self) -> Path:
        return self.root / "templates"

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def images_readme(self) -> Path:
        return self.images / IMAGES_README

    @property
    def runtime(self) -> Path:
        return self.root / "runtime"

    @property
    def build(self) -> Path:
        return self.root / "build"

    @property
    def context(self) -> Path:
        """build/context/: what the Dockerfiles see (staged by builder.content.stage_context)."""
        return self.build / "context"

    @property
    def logs(self) -> Path:
        return self.build / "logs"

    @property
    def reports(self) -> Path:
        return self.build / "reports"

    @property
    def memo(self) -> Path:
        """build/cache/memo/: resolutions and build jobs keyed by their inputs (builder.memo)."""
        return self.build / "cache" / "memo"

    def dockerfile(self, image_id: str) -> Path:
        return self.images / image_id / "Dockerfile"
