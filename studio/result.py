"""What one run of any technique returns: images, the settings that remake each, and notes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass
class Result:
    settings: object  # the technique's settings, resolved: every default filled in, the seed drawn
    images: list = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    family: str = ""
    duration_s: float = 0.0
    notes: list[str] = field(default_factory=list)  # what the run did that the user should know
    figures: dict = field(default_factory=dict)  # named pictures a run drew besides its images

    def image_settings(self, index: int):
        """The settings that remake image `index` alone."""
        names = {f.name for f in dataclasses.fields(self.settings)}
        single = {k: 1 for k in ("batch_size", "batch_count") if k in names}
        return self.settings.replace(seed=self.seeds[index], **single)
