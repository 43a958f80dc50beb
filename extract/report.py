"""What one extraction run did, as `refseg-extract` prints it."""

from __future__ import annotations

from dataclasses import dataclass, field

from refseg.extract.stages import Stage


@dataclass
class ExtractionReport:
    n_samples: int
    n_images: int
    noise_ts: tuple[int, ...]
    rows_computed: dict[Stage, int] = field(default_factory=dict)  # rows computed in this run (not skipped)
    rows_skipped: dict[Stage, int] = field(default_factory=dict)  # rows stored as zeros: bad input (--skip-bad)
    truncated: int = 0  # sentences longer than --token-length (counted over all selected samples)
    bad: dict[int, str] = field(default_factory=dict)  # sent_id -> reason (with --skip-bad)
    shards_left: dict[Stage, int] = field(default_factory=dict)  # shards another process was writing
    incomplete: dict[int, int] = field(default_factory=dict)  # noise level -> shards not finished when it ended
    # resumed a store whose dataset files changed since it was made (stage 1 was complete: nothing mixed)
    dataset_changed: bool = False
    seconds: float = 0.0

    DATASET_CHANGED_NOTE = ("the dataset changed since this cache was made; its stage 1 was complete, so the new "
                            "noise levels were computed from the latents, sentences and masks stored in it, "
                            "not from the new files")

    @property
    def computed(self) -> dict[str, int]:
        """Rows computed in this run per stage, by the stage's printed name ("unet T=5")."""
        return {str(stage): n for stage, n in self.rows_computed.items()}

    @property
    def left_to_others(self) -> dict[str, int]:
        """Shards left to another process writing the store, per stage, by its printed name."""
        return {str(stage): n for stage, n in self.shards_left.items()}

    def lines(self) -> list[str]:
        out = [f"cache: {self.n_samples} samples, {self.n_images} images, noise levels {list(self.noise_ts)}"]
        for stage, n in self.rows_computed.items():
            out.append(f"  {stage}: {n} computed this run")
            if self.rows_skipped.get(stage):
                out.append(f"  {stage}: {self.rows_skipped[stage]} skipped as bad (stored as zeros, not computed)")
        for stage, n in self.left_to_others.items():
            out.append(f"  {stage}: {n} shards left to another process writing this store")
        if self.incomplete:
            levels = ", ".join(f"T={t}: {n} shards" for t, n in sorted(self.incomplete.items()))
            out.append(f"  not complete yet ({levels} to do): other --shard parts still to run or running")
        out.append(f"  sentences truncated to the token length: {self.truncated}")
        if self.bad:
            out.append(f"  skipped bad samples: {len(self.bad)}")
            out += [f"    sent_id {sid}: {why}" for sid, why in sorted(self.bad.items())[:20]]
        out.append(f"  time: {self.seconds:.1f} s")
        return out
