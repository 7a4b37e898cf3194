"""The co-evolution run's configuration: the two stage recipes, the number of rounds, the prompts the generators
draw each round, and the sets that measure each round."""

from __future__ import annotations

from dataclasses import dataclass, field

from unigendet.config.loader import ConfigError
from unigendet.evaluation.image_generation import GenerationSettings

# Written as the answer of every generated fake added to the detection data: the FakeClue answer convention (the
# verdict phrase first), then a generic description, since nothing is known about a generated image's artefacts
# beyond its origin. One is picked per image with a seeded generator.
DEFAULT_FAKE_ANSWERS = (
    "This is a fake image. It was produced by a text-to-image model: its textures are smoother and more regular "
    "than a camera records.",
    "This is a fake image. The picture lacks natural sensor noise and its fine detail is synthesised, as a "
    "generative model's output is.",
    "This is a fake image. Its structures are plausible at a glance, but the fine texture shows the regular "
    "patterns of a generator.",
)


DEFAULT_REAL_ANSWERS = (
    "This is a real image. Its fine detail, noise and textures are those of a photograph.",
    "This is a real image. The picture shows the irregular detail and natural noise of a camera.",
)


@dataclass
class PromptSetConfig:
    """The captions every round's generator draws: a table (parquet, JSON list or JSONL) with a caption column
    and, optionally, a group column naming what each caption depicts (the key of caption consistency)."""

    data_files: list[str] = field(default_factory=list)
    caption_column: str = "caption"
    group_column: str | None = None
    per_prompt: int = 1  # images per caption, each from its own seed
    limit: int | None = None  # the first ``limit`` captions of the table

    def validate(self) -> None:
        if not self.data_files:
            raise ConfigError("prompts.data_files: name at least one caption table")
        if self.per_prompt < 1:
            raise ConfigError(f"prompts.per_prompt must be >= 1, got {self.per_prompt}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"prompts.limit must be >= 1, got {self.limit}")


@dataclass
class ReferenceConfig:
    """Real images a round's generations are compared with: ``consistency`` (a table with an image column and the
    prompts' group column: is each generation nearest to an image of its caption's group?) and ``distance``
    (a table of held-out real images: Fréchet distance and KID on fixed image features)."""

    consistency: str | None = None
    distance: str | None = None
    image_column: str = "image"
    group_column: str = "group"


@dataclass
class CoevolutionConfig:
    """``rounds`` rounds of GDUF then DIGA. Round 1's GDUF runs the ``gduf`` recipe as it is; round r > 1 continues
    from round r-1's DIGA model for ``later_gduf_steps`` steps, its detection data extended by the images every
    earlier round's generator drew (labelled fake, answers from ``fake_answers``, sampled with ``fake_weight``).
    Each round's DIGA starts from that round's GDUF export and aligns to it as its frozen teacher."""

    gduf: str = ""
    diga: str = ""
    rounds: int = 2
    out_dir: str = "runs/coevolution"
    gduf_overrides: list[str] = field(default_factory=list)
    diga_overrides: list[str] = field(default_factory=list)
    later_gduf_steps: int | None = None  # None: the gduf recipe's total_steps
    # Overrides of every later round's GDUF only, after ``gduf_overrides`` (e.g. a longer warm-up: a later round
    # restarts the learning-rate schedule on a model whose generation expert DIGA has just moved).
    later_gduf_overrides: list[str] = field(default_factory=list)
    fake_weight: float = 1.0  # sampling weight of each round's added detection data (a FakeClue source)
    fake_answers: list[str] = field(default_factory=lambda: list(DEFAULT_FAKE_ANSWERS))
    # Real images added with each round's fakes, one per fake, so the added data stay balanced and the detector
    # cannot learn "what the generator draws" instead of "how it draws": a table (parquet / JSON list / JSONL) with
    # an image column (encoded bytes, or paths relative to the table's folder), e.g. the text-to-image data whose
    # captions the generators draw. None adds fakes only.
    real_table: str | None = None
    real_image_column: str = "image"
    real_answers: list[str] = field(default_factory=lambda: list(DEFAULT_REAL_ANSWERS))
    prompts: PromptSetConfig = field(default_factory=PromptSetConfig)
    generation: GenerationSettings = field(default_factory=lambda: GenerationSettings(height=64, width=64,
                                                                                       num_steps=30, seed=0,
                                                                                       batch_size=16))
    # Held-out detection sets scored with each round's detector head: name -> FakeClue JSON.
    eval_sets: dict[str, str] = field(default_factory=dict)
    eval_image_root: str | None = None
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    seed: int = 0

    def validate(self) -> None:
        if not self.gduf or not self.diga:
            raise ConfigError("gduf and diga: name both stage recipes")
        if self.rounds < 1:
            raise ConfigError(f"rounds must be >= 1, got {self.rounds}")
        if self.later_gduf_steps is not None and self.later_gduf_steps < 1:
            raise ConfigError(f"later_gduf_steps must be >= 1, got {self.later_gduf_steps}")
        if self.fake_weight <= 0:
            raise ConfigError(f"fake_weight must be > 0, got {self.fake_weight}")
        for key, verdict in (("fake_answers", "fake"), ("real_answers", "real")):
            answers = getattr(self, key)
            bad = [a for a in answers if verdict not in a.lower()]
            if not answers or bad:
                raise ConfigError(f"{key}: every answer must state the verdict '{verdict}' (the FakeClue scoring reads "
                                  f"it); offending: {bad[:1]}")
        self.prompts.validate()
        self.generation.validate()
