"""Offline stand-ins for the hub artifacts that `rlhf` is built around, made here by real (small) training runs.

Real users tune EleutherAI/gpt-neox-20b on stanfordnlp/imdb with lvwerra/distilbert-imdb as the reward. Tests and
`rlhf quickstart` run offline, so they use three fixtures that go through exactly the same code paths:

- ``fixture:imdb`` stands in for stanfordnlp/imdb: a synthetic corpus of templated movie reviews with IMDB's schema
  (``train.jsonl`` / ``test.jsonl``, columns ``text`` and ``label``, 0 = negative, 1 = positive, balanced). Every
  review opens with a sentiment-neutral sentence, so the first tokens of a review (the PPO prompts) do not give the
  label away; the sentences after it carry the sentiment, through words from a positive or a negative lexicon.
- ``fixture:tiny-gpt-neox`` stands in for EleutherAI/gpt-neox-20b: a ``GPTNeoXForCausalLM`` with 4 layers of width 64,
  with a byte-level BPE tokenizer trained on the corpus (``<|endoftext|>`` is bos, eos and unk; no pad token, no
  automatic BOS — like gpt-neox-20b's), briefly pretrained on the train reviews so that it writes review-like text
  whose sentiment after a neutral opener is a coin flip. Saved in float32 as a normal HF model dir, so that loading
  it in 8-bit through bitsandbytes is the real path.
- ``fixture:imdb-preferences`` stands in for a preference data set (columns ``prompt``, ``chosen``, ``rejected``):
  pairs built from the corpus, the first words of a review and two continuations, the more favourable one chosen
  (positive over negative, over neutral, over itself with its sentiment words swapped), for `rlhf reward`.
- ``fixture:tiny-distilbert-imdb`` stands in for lvwerra/distilbert-imdb: a 2-layer
  ``DistilBertForSequenceClassification`` (labels NEGATIVE / POSITIVE) with its own lowercase WordPiece tokenizer,
  trained on the labelled reviews and on short fragments of them, because at PPO time it scores short texts.

Everything is cached under ``cache_root()/fixtures-v3-seed{seed}/`` and built at most once: each artifact is built
in a temporary directory beside its final place and renamed when complete, under a file lock, so an interrupted
build leaves nothing half-written and two processes never build the same artifact at once. A build is
deterministic for a seed on a given machine.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shutil
import string
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

FIXTURES_VERSION = "v3"  # bump when a change to this file changes what is built: old caches are then ignored

# name used in recipes and on the command line -> subdirectory of the fixtures dir
FIXTURE_NAMES = {
    "fixture:imdb": "imdb",
    "fixture:tiny-gpt-neox": "tiny-gpt-neox",
    "fixture:tiny-distilbert-imdb": "tiny-distilbert-imdb",
    "fixture:imdb-preferences": "imdb-preferences",
}

EOS_TOKEN = "<|endoftext|>"
LABELS = {0: "NEGATIVE", 1: "POSITIVE"}

N_TRAIN, N_TEST = 4000, 1000


@dataclass(frozen=True)
class FixturePaths:
    imdb: Path  # directory with train.jsonl, test.jsonl, README.md
    policy: Path  # HF model dir: tiny GPT-NeoX + byte-level BPE tokenizer
    reward: Path  # HF model dir: tiny DistilBERT sentiment classifier + WordPiece tokenizer
    preferences: Path  # directory with train.jsonl, test.jsonl (prompt, chosen, rejected), README.md


def cache_root() -> Path:
    """`$RLHF_CACHE` if set, else the user cache dir (~/.cache/rlhf on Linux)."""
    if env := os.environ.get("RLHF_CACHE"):
        return Path(env).expanduser()
    try:
        from platformdirs import user_cache_dir
    except ImportError:
        return Path.home() / ".cache" / "rlhf"
    return Path(user_cache_dir("rlhf"))


def fixtures_dir(seed: int = 0) -> Path:
    return cache_root() / f"fixtures-{FIXTURES_VERSION}-seed{seed}"


def is_fixture(name: str) -> bool:
    return name in FIXTURE_NAMES


def resolve_fixture(name: str, seed: int = 0, progress: bool = True) -> Path:
    """Local path of the fixture called `name` (e.g. "fixture:tiny-gpt-neox"), built first if missing."""
    if not is_fixture(name):
        raise ValueError(f"unknown fixture {name!r}; the fixtures are: {', '.join(FIXTURE_NAMES)}")
    root = fixtures_dir(seed)
    imdb = _ensure(root / "imdb", lambda out: build_imdb(out, seed), "imdb (synthetic reviews)", progress)
    if name == "fixture:imdb":
        return imdb
    if name == "fixture:imdb-preferences":
        build_pairs = lambda out: build_preferences(out, imdb, seed)  # noqa: E731
        return _ensure(root / FIXTURE_NAMES[name], build_pairs, "imdb-preferences (pairs from the corpus)", progress)
    build, what = {  # both models learn from the corpus, so it is built first
        "fixture:tiny-gpt-neox": (build_policy, f"tiny-gpt-neox (BPE tokenizer, pretraining {PRETRAIN_STEPS} steps)"),
        "fixture:tiny-distilbert-imdb": (build_reward, f"tiny-distilbert-imdb (training {CLASSIFIER_STEPS} steps)"),
    }[name]
    return _ensure(root / FIXTURE_NAMES[name], lambda out: build(out, imdb, seed), what, progress)


def ensure_fixtures(seed: int = 0, progress: bool = True) -> FixturePaths:
    """Build whatever is missing of the fixtures for `seed` and return their paths."""
    return FixturePaths(
        imdb=resolve_fixture("fixture:imdb", seed, progress),
        policy=resolve_fixture("fixture:tiny-gpt-neox", seed, progress),
        reward=resolve_fixture("fixture:tiny-distilbert-imdb", seed, progress),
        preferences=resolve_fixture("fixture:imdb-preferences", seed, progress),
    )


def _ensure(final: Path, build: Callable[[Path], str], what: str, progress: bool) -> Path:
    """Build into a temp dir beside `final` and rename it into place; `final` existing means complete.

    `build` fills the directory it is given and returns a one-line summary for the progress output.
    """
    if final.is_dir():
        return final
    from filelock import FileLock

    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        if final.is_dir():  # another process built it while we waited for the lock
            return final
        if progress:
            print(f"building fixture: {what}...", file=sys.stderr, flush=True)
        start = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
        try:
            summary = build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is not secret
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if progress:
            elapsed = time.perf_counter() - start
            print(f"built fixture: {final.name} in {elapsed:.1f}s ({summary}) -> {final}", file=sys.stderr)
    return final


# ---------------------------------------------------------------------------------------------------------------------
# 1. The synthetic IMDB corpus
# ---------------------------------------------------------------------------------------------------------------------

FIRST_NAMES = (
    "Anna Ben Clara David Elena Frank Grace Henry Iris Jack Karen Leo Maya Nathan Olivia Paul Quinn Rosa Samuel Tara "
    "Victor Wendy Xavier Yara Zoe Marcus Helen Oscar Nina Hugo Sofia Ethan Lucia Omar Ingrid Felix Aisha Tomas Greta "
    "Bruno Camille Dmitri Esther Fatima Gustav Hana Ivan Jonas Kofi Lars Mirela Noah Paloma Rafael Selma Tobias Ursula "
    "Vera Wilhelm Agnes Bernard Cecilia Desmond Eliza Florian Gideon Harriet Isidore Josephine"
).split()
LAST_NAMES = (
    "Walsh Moreno Kim Novak Fischer Okafor Lindqvist Duarte Brennan Sato Kowalski Haddad Ferreira Larsen Ortega "
    "Nakamura Petrov Quinlan Rossi Abbott Whitaker Dubois Costa Jensen Marsh Reyes Tanaka Volkov Weber Young Castillo "
    "Hargreaves Mbeki Johansson Caruso Delacroix Ivanova Mendez Oyelaran Sandoval Albrecht Beaumont Carvalho Dragomir "
    "Eriksen Fontaine Gallagher Holloway Iglesias Jablonski Kaminski Lombardi Montgomery Nieminen Ostrowski Pemberton "
    "Quintero Rasmussen Szabo Thornbury Underwood Valentini Wainwright Yamamoto Zielinski Achterberg Brandstetter"
).split()
PEOPLE = [f"{first} {last}" for first in FIRST_NAMES for last in LAST_NAMES]

# Word lists are data tables: kept dense rather than one item a line.
# fmt: off
# Slots that any review may use, whatever its label.
NEUTRAL_SLOTS: dict[str, Sequence[str]] = {
    "film": ["film", "movie", "picture", "feature"],
    "genre": [
        "thriller", "comedy", "drama", "western", "horror film", "romance", "war film", "musical", "mystery",
        "documentary", "science fiction film", "period piece", "crime story", "family film", "road movie", "biopic",
    ],
    "subject": [
        "retired detective", "young widow", "struggling musician", "small-town teacher", "war veteran",
        "teenage runaway", "lonely astronaut", "ambitious lawyer", "family of farmers", "group of college friends",
        "former boxer", "shy librarian", "con artist", "single father", "famous chef", "young nurse",
        "stubborn sheriff", "talented painter", "ghost hunter", "fishing crew", "chess prodigy", "travelling salesman",
        "village priest", "night watchman", "pair of estranged brothers", "marine biologist", "jazz pianist",
        "undercover agent", "newspaper editor", "circus acrobat", "lighthouse keeper", "beekeeper", "retired pilot",
        "orphaned teenager", "stand-up comedian", "mountain guide", "disgraced surgeon", "wedding planner",
        "taxi driver", "veterinarian", "opera singer", "rookie firefighter", "museum curator", "stamp collector",
    ],
    "event": [
        "returns home after twenty years", "tries to save a failing business", "falls for a stranger",
        "searches for a missing sister", "plans one last heist", "uncovers a family secret",
        "enters a dance competition", "is stranded on an island", "runs for mayor",
        "investigates a series of strange murders", "inherits an old hotel", "travels across the country by train",
        "hides a fugitive in the attic", "trains for a marathon", "opens a bakery", "loses everything in a flood",
        "rebuilds a wrecked sailboat", "joins a traveling band", "tracks a stolen painting", "moves to a new city",
        "smuggles medicine across a frontier", "restores a crumbling vineyard", "coaches a hockey team",
        "befriends a talking parrot", "escapes from a prison camp", "writes letters to a pen pal", "climbs a glacier",
        "adopts an elderly greyhound", "deciphers an encrypted diary", "organizes a village carnival",
    ],
    "place": [
        "Paris", "Tokyo", "a small village in Maine", "Chicago", "the Scottish Highlands", "rural Texas", "Berlin",
        "a mining town", "New Orleans", "Lisbon", "a space station", "Mumbai", "Dublin", "the Arctic",
        "a quiet suburb", "Buenos Aires", "Naples", "a fishing village", "Istanbul", "Montreal", "Cape Town",
        "a border town", "Reykjavik", "Marseille", "Havana", "Kyoto", "Warsaw", "Nairobi", "Anchorage", "Sicily",
        "Valparaiso", "Edinburgh", "Tangier", "Salzburg", "Vancouver", "Bangkok", "Patagonia", "Yorkshire", "Krakow",
    ],
    "aspect": [
        "acting", "plot", "score", "script", "dialogue", "cinematography", "ending", "pacing", "cast", "soundtrack",
        "story", "editing", "direction", "camera work", "screenplay", "humor", "lighting", "costume design",
        "final act", "opening scene", "action scenes", "special effects", "music", "character development",
        "production design", "chase sequence", "set design", "love story",
    ],
    "role": [
        "detective", "villain", "mother", "hero", "old friend", "captain", "doctor", "old king", "young soldier",
        "mentor", "journalist", "father", "landlady", "getaway driver", "professor", "mayor",
    ],
    "relation": [
        "wife", "husband", "brother", "sister", "parents", "kids", "close friend", "girlfriend", "boyfriend",
        "roommate", "grandmother", "colleagues", "neighbor", "cousin",
    ],
    "when": [
        "last weekend", "last night", "on Friday", "on a Sunday afternoon", "last month", "over Christmas",
        "this summer", "on a long flight", "yesterday", "a few days ago",
    ],
    "venue": ["cinema", "local theater", "film festival", "drive-in", "multiplex", "art house"],
    "year": [str(year) for year in range(1962, 2024, 3)],
    "minutes": ["ninety", "one hundred", "two hours", "eighty", "one hundred and twenty", "one hundred and forty"],
    "person": PEOPLE,
}

# Slots whose filler depends on the sentence's sentiment: (positive options, negative options).
POLAR_SLOTS: dict[str, tuple[Sequence[str], Sequence[str]]] = {
    "adj": (
        [
            "wonderful", "brilliant", "superb", "excellent", "delightful", "charming", "gripping", "beautiful",
            "stunning", "masterful", "moving", "heartfelt", "memorable", "outstanding", "captivating", "fantastic",
            "great", "touching", "clever", "powerful", "fresh", "witty", "enchanting", "remarkable", "terrific",
            "lovely", "inspired", "perfect", "thrilling", "elegant",
        ],
        [
            "terrible", "awful", "boring", "dull", "clumsy", "lifeless", "painful", "forgettable", "tedious",
            "horrible", "bland", "wooden", "predictable", "mediocre", "dreadful", "pointless", "messy",
            "disappointing", "weak", "poor", "lazy", "stupid", "ugly", "annoying", "confusing", "cheap", "tiresome",
            "laughable", "sloppy", "hollow",
        ],
    ),
    "feel": (["loved", "adored", "enjoyed", "admired", "relished"], ["hated", "disliked", "loathed", "detested"]),
    "react": (["smile", "grin", "cheer", "beam"], ["yawn", "cringe", "groan", "wince"]),
    "superl": (["best", "finest", "greatest", "strongest"], ["worst", "weakest", "dullest", "silliest"]),
    "again": (["happily", "gladly", "eagerly"], ["never", "hardly", "barely"]),
    "experience": (["a delight", "a pleasure", "a treat", "a joy"], ["a chore", "a slog", "an ordeal", "a bore"]),
    "shines": (["shines", "excels", "triumphs", "soars"], ["flounders", "struggles", "fails", "stumbles"]),
    "verdict": (
        ["Highly recommended.", "A true gem.", "Pure joy.", "Loved it.", "A triumph."],
        ["Avoid it.", "Skip this one.", "A total waste of time.", "Hated it.", "A disaster."],
    ),
}

# fmt: on

# Words of the polar slots that decide a sentence's sentiment (the function words around them do not).
_FUNCTION_WORDS = {"a", "an", "it", "this", "one", "of", "the", "to", "total", "pure", "true", "time"}


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+", text.lower())


POSITIVE_CUES = frozenset(w for opt in (o for pos, _ in POLAR_SLOTS.values() for o in pos) for w in _words(opt))
NEGATIVE_CUES = frozenset(w for opt in (o for _, neg in POLAR_SLOTS.values() for o in neg) for w in _words(opt))
POSITIVE_CUES, NEGATIVE_CUES = POSITIVE_CUES - _FUNCTION_WORDS, NEGATIVE_CUES - _FUNCTION_WORDS

# Neutral openers: what the first 2-8 tokens of a review (the PPO prompts) are drawn from. Mostly short, so that
# a 4-16 token continuation reaches the first sentiment-bearing sentence.
OPENERS = [
    "I watched this {film} {when}.",
    "I saw this {film} at the {venue}.",
    "This {genre} is about a {subject}.",
    "Set in {place}, it follows a {subject}.",
    "I rented this {film} {when}.",
    "My {relation} and I watched it {when}.",
    "This is a {genre} by {person}.",
    "I caught this {genre} {when}.",
    "So I finally saw this {film}.",
    "We watched this {genre} {when}.",
    "It is a {genre} set in {place}.",
    "I went into this {film} knowing nothing about it.",
    "This {genre} is about a {subject} who {event}.",
]
FILLERS = [
    "It runs for about {minutes} minutes.",
    "The story takes place in {place}.",
    "{person} plays the {role}.",
    "It came out in {year}.",
    "The {film} was shot in {place}.",
    "The {role} is played by {person}.",
    "It is a {genre} at heart.",
    "The {subject} {event}.",
]
SENTIMENT_SENTENCES = [
    "The {aspect} is {adj}.",
    "The {aspect} was {adj} and the {aspect2} was {adj2}.",
    "{person} is {adj} as the {role}.",
    "{person} gives a {adj} performance as the {role}.",
    "I {feel} the {aspect}.",
    "The {aspect} made me {react}.",
    "It is one of the {superl} {film}s I have seen this year.",
    "I would {again} watch it again.",
    "What a {adj} {film}!",
    "Every scene with {person} is {experience}.",
    "Watching it was {experience}.",
    "{person} {shines} in the role of the {role}.",
    "The {aspect} is {adj}, and the {aspect2} is even more {adj2}.",
    "As a {genre}, it {shines}.",
]
CLOSERS = ["Overall, a {adj} {film}.", "{verdict}", "In short, {adj}.", "All in all, the {superl} {genre} of its year."]
CONTRAST_OPENERS = ["That said,", "On the other hand,", "Even so,"]

_FORMATTER = string.Formatter()


def _fill(template: str, rng: random.Random, positive: bool) -> str:
    """Fill every {slot} of `template`; a trailing digit (adj2) draws the same kind of slot again."""
    values = {}
    for _, field, _, _ in _FORMATTER.parse(template):
        if field is None or field in values:
            continue
        kind = field.rstrip("0123456789")
        options = POLAR_SLOTS[kind][0 if positive else 1] if kind in POLAR_SLOTS else NEUTRAL_SLOTS[kind]
        values[field] = rng.choice(options)
    text = template.format(**values)
    return text[0].upper() + text[1:]


def make_review(rng: random.Random, label: int) -> str:
    """One review: a neutral opener, 3-6 sentences that follow the label (one may contrast), neutral fillers."""
    positive = label == 1
    sentences = [_fill(rng.choice(OPENERS), rng, positive)]
    n_sentiment = rng.randint(3, 6)
    contrast_at = rng.randint(1, n_sentiment - 1) if rng.random() < 0.2 else None  # never the first sentiment
    for i in range(n_sentiment):
        if i == contrast_at:
            sentence = _fill(rng.choice(SENTIMENT_SENTENCES), rng, not positive)
            if sentence.split()[0] not in ("I", *FIRST_NAMES):
                sentence = sentence[0].lower() + sentence[1:]
            sentences.append(f"{rng.choice(CONTRAST_OPENERS)} {sentence}")
        else:
            sentences.append(_fill(rng.choice(SENTIMENT_SENTENCES), rng, positive))
        if i < n_sentiment - 1 and rng.random() < 0.25:
            sentences.append(_fill(rng.choice(FILLERS), rng, positive))
    if rng.random() < 0.8:
        sentences.append(_fill(rng.choice(CLOSERS), rng, positive))
    return " ".join(sentences)


def make_split(rng: random.Random, n: int) -> list[dict[str, str | int]]:
    """`n` reviews, exactly half of each label, in random order."""
    labels = [i % 2 for i in range(n)]
    rng.shuffle(labels)
    return [{"text": make_review(rng, label), "label": label} for label in labels]


def cue_balance(text: str) -> int:
    """Positive minus negative lexicon words in `text`: > 0 reads positive, < 0 negative, 0 neutral."""
    words = _words(text)
    return sum(w in POSITIVE_CUES for w in words) - sum(w in NEGATIVE_CUES for w in words)


def build_imdb(out: Path, seed: int) -> str:
    rng = random.Random(f"imdb-{seed}")
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        _write_jsonl(out / f"{split}.jsonl", make_split(rng, n))
    (out / "README.md").write_text(
        "# fixture:imdb — synthetic stand-in for stanfordnlp/imdb\n\n"
        f"Built by `rlhf.fixtures` (version {FIXTURES_VERSION}, seed {seed}); offline, for tests and the quickstart.\n"
        f"Templated movie reviews with IMDB's schema: `train.jsonl` ({N_TRAIN}) and `test.jsonl` ({N_TEST}), one JSON\n"
        "object a line with `text` (str) and `label` (int: 0 = negative, 1 = positive), labels balanced.\n"
        "Each review opens with a sentiment-neutral sentence; its later sentences use a positive or a negative\n"
        "lexicon (about one review in five has one contrasting sentence). Not real reviews: do not report results\n"
        "on it as IMDB results.\n\n"
        "```python\n"
        'datasets.load_dataset("json", data_files={"train": "train.jsonl", "test": "test.jsonl"})\n'
        "```\n"
    )
    return f"{N_TRAIN} train and {N_TEST} test reviews"


def load_split(imdb: Path, split: str) -> list[dict]:
    with open(imdb / f"{split}.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------------------------
# 1b. Preference pairs from the corpus
# ---------------------------------------------------------------------------------------------------------------------

PREFERENCE_PROMPT_WORDS = (2, 5)  # the prompt: the first 2-5 words of a review, like a PPO prompt of 2-8 tokens
PREFERENCE_BODY_WORDS = (1, 12)  # words of the review's sentiment part after the opening sentence, drawn per side
PREFERENCE_EXTRA_WORDS = 4  # up to this many words more after the first that decides a side: endings vary


def _continuation(rng: random.Random, body: str, sign: int) -> str | None:
    """The start of `body` that reads as `sign` (+1: cue_balance > 0, -1: < 0, 0: no sentiment word yet).

    +1/-1: n words, n drawn from PREFERENCE_BODY_WORDS, extended until the words read as `sign`, then up to
    PREFERENCE_EXTRA_WORDS more while they still do. 0: the words before the first sentiment word (maybe none).
    None when the body never reads as `sign`.
    """
    words = body.split()
    if sign == 0:
        first = next((i for i in range(len(words)) if cue_balance(words[i])), len(words))
        return " ".join(words[: rng.randint(0, first)])
    n = rng.randint(*PREFERENCE_BODY_WORDS)
    while n <= len(words) and cue_balance(" ".join(words[:n])) * sign <= 0:
        n += 1
    if n > len(words):
        return None
    extra = min(n + rng.randint(0, PREFERENCE_EXTRA_WORDS), len(words))
    while cue_balance(" ".join(words[:extra])) * sign <= 0:
        extra -= 1
    return " ".join(words[:extra])


def _swap_cues(rng: random.Random, text: str, to_sign: int) -> str:
    """`text` with every lexicon word of the other sign replaced by a random one of `to_sign`: the same words around
    them, the opposite judgement (so a reward model must read the sentiment words, not the sentence templates)."""
    source, target = (NEGATIVE_CUES, _POSITIVE_WORDS) if to_sign > 0 else (POSITIVE_CUES, _NEGATIVE_WORDS)
    return re.sub(r"[A-Za-z]+", lambda m: rng.choice(target) if m.group().lower() in source else m.group(), text)


_POSITIVE_WORDS, _NEGATIVE_WORDS = sorted(POSITIVE_CUES), sorted(NEGATIVE_CUES)  # sorted: a set's order varies by run

# Each kind a (chosen, rejected) rule, a person's "which continues this review more favourably?":
# natural  a positive review's own continuation over a negative review's
# swapped  a continuation over itself with its sentiment words swapped for opposite ones (either way round)
# pos>neu, neu>neg  so that unfinished neutral text (what a policy writes first) has a place on the scale: the words of
#          a positive continuation before its first sentiment word, below it and above a negative continuation
PREFERENCE_KINDS = ("natural", "swapped", "pos>neu", "neu>neg")
PAIRS_PER_REVIEW = 2  # each review gives two pairs, cut differently


def _sides(rng: random.Random, kind: str, good: str, bad: str) -> tuple[str | None, str | None]:
    if kind == "natural":
        return _continuation(rng, good, +1), _continuation(rng, bad, -1)
    if kind == "swapped":
        if rng.random() < 0.5:
            chosen = _continuation(rng, good, +1)
            return chosen, chosen and _swap_cues(rng, chosen, -1)
        rejected = _continuation(rng, bad, -1)
        return rejected and _swap_cues(rng, rejected, +1), rejected
    if kind == "pos>neu":
        return _continuation(rng, good, +1), _continuation(rng, good, 0)
    return _continuation(rng, good, 0), _continuation(rng, bad, -1)


def preference_pairs(rows: Sequence[dict], seed: int, split: str) -> list[dict[str, str]]:
    """Pairs of continuations of one prompt (the first words of a positive review), by the kinds above: the chosen
    side continues more favourably than the rejected one, every time, as the lexicon checks each side (a contrasting
    sentence never lands a pair on the wrong side). Each side's length is drawn independently, so length alone tells
    nothing. Half the time both sides first finish the review's neutral opening sentence.
    """
    rng = random.Random(f"preferences-{seed}-{split}")
    positive = [r["text"] for r in rows if r["label"] == 1]
    negative = [r["text"] for r in rows if r["label"] == 0]
    pairs = []
    for i, (good, bad) in enumerate(zip(positive, negative)):
        opener, _, good_body = good.partition(". ")
        bad_body = bad.partition(". ")[2]
        words = opener.split()
        for j in range(PAIRS_PER_REVIEW):
            k = rng.randint(*PREFERENCE_PROMPT_WORDS)
            if len(words) <= k:
                continue
            # Half the time the continuation leaves the opening sentence unfinished, as a policy's often does.
            rest = " " + " ".join(words[k:]) + "." if rng.random() < 0.5 else ""
            kind = PREFERENCE_KINDS[(PAIRS_PER_REVIEW * i + j) % len(PREFERENCE_KINDS)]
            sides = _sides(rng, kind, good_body, bad_body)
            if None in sides:
                continue
            chosen, rejected = (f"{rest} {side}".rstrip() for side in sides)
            if not (chosen and rejected):  # a neutral side of no words after an unfinished opening
                continue
            pairs.append({"prompt": " ".join(words[:k]), "chosen": chosen, "rejected": rejected})
    return pairs


def build_preferences(out: Path, imdb: Path, seed: int) -> str:
    counts = {}
    for split in ("train", "test"):
        pairs = preference_pairs(load_split(imdb, split), seed, split)
        _write_jsonl(out / f"{split}.jsonl", pairs)
        counts[split] = len(pairs)
    (out / "README.md").write_text(
        "# fixture:imdb-preferences — synthetic preference pairs for `rlhf reward`\n\n"
        f"Built by `rlhf.fixtures` (version {FIXTURES_VERSION}, seed {seed}) from the `fixture:imdb` reviews of the\n"
        f"same split: `train.jsonl` ({counts['train']} pairs) and `test.jsonl` ({counts['test']}), one JSON object a\n"
        "line with `prompt` (the first 2-5 words of a positive review) and two continuations (half the time after\n"
        "the rest of its neutral opening sentence): `chosen` continues more favourably than `rejected`. A quarter of\n"
        "the pairs each: the review's own positive continuation over a negative review's; a continuation over itself\n"
        "with its sentiment words swapped for opposite ones; positive over neutral (the words before the first\n"
        "sentiment word); neutral over negative. Each side's length is drawn independently. Not real preferences: a\n"
        "stand-in with the common `prompt`/`chosen`/`rejected` schema.\n"
    )
    return f"{counts['train']} train and {counts['test']} test pairs"


# ---------------------------------------------------------------------------------------------------------------------
# 2-3. The policy: byte-level BPE tokenizer + tiny GPT-NeoX, pretrained on the reviews
# ---------------------------------------------------------------------------------------------------------------------

BPE_VOCAB_SIZE = 2048
# ~1.7 epochs of the train reviews (~240k tokens). At this size each step costs mostly per-op overhead, so fewer,
# larger batches are the cheaper way to the same tokens: ~0.08 s a step on 2 CPU cores.
PRETRAIN_STEPS = 200
PRETRAIN_BATCH, PRETRAIN_BLOCK = 32, 64
PRETRAIN_LR = 4e-3  # a 4-layer, width-64 model wants a far larger step than a big one


def train_bpe_tokenizer(texts: Sequence[str]):
    """Byte-level BPE like gpt-neox-20b's: `<|endoftext|>` (id 0) is bos, eos and unk; no pad; no added BOS."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodable: no unknown text, ever
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, unk_token=EOS_TOKEN, model_max_length=256
    )


def lm_blocks(tokenizer, texts: Sequence[str], block_size: int):
    """All texts joined with EOS after each, cut into (n_blocks, block_size) token ids; the tail is dropped."""
    import torch

    ids: list[int] = []
    for encoded in tokenizer(list(texts))["input_ids"]:
        ids.extend(encoded)
        ids.append(tokenizer.eos_token_id)
    n_blocks = len(ids) // block_size
    return torch.tensor(ids[: n_blocks * block_size]).view(n_blocks, block_size)


def _lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to a tenth of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def build_policy(out: Path, imdb: Path, seed: int) -> str:
    import torch
    from transformers import GenerationConfig, GPTNeoXConfig, GPTNeoXForCausalLM

    texts = [row["text"] for row in load_split(imdb, "train")]
    tokenizer = train_bpe_tokenizer(texts)
    eos = tokenizer.eos_token_id
    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=256,
        use_parallel_residual=True,  # as in gpt-neox-20b; rotary embeddings on a quarter of each head, also as there
        tie_word_embeddings=False,
        bos_token_id=eos,
        eos_token_id=eos,
    )
    model = GPTNeoXForCausalLM(config)
    # Give the output head's rows a realistic spread (gpt-neox-20b's are ~0.02*sqrt(6144) ~ 1.6 long). At width 64 the
    # default std 0.02 leaves words that fill the same template slot so close that a frozen head and final LayerNorm
    # cap their probability: LoRA on the linears then cannot go below ~0.7 nats on `rlhf sft --recipe memorize`.
    with torch.no_grad():
        model.get_output_embeddings().weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(seed))
    blocks = lm_blocks(tokenizer, texts, PRETRAIN_BLOCK)
    loss = _pretrain(model, blocks, torch.Generator().manual_seed(seed))
    model.generation_config = GenerationConfig(bos_token_id=eos, eos_token_id=eos)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        "# fixture:tiny-gpt-neox — stand-in for EleutherAI/gpt-neox-20b\n\n"
        f"Built by `rlhf.fixtures` (version {FIXTURES_VERSION}, seed {seed}); offline, for tests and the quickstart.\n"
        f"GPTNeoXForCausalLM, {model.num_parameters():,} parameters (hidden 64, 4 layers, 4 heads), float32,\n"
        f"pretrained for {PRETRAIN_STEPS} steps on the `fixture:imdb` train reviews. Byte-level BPE tokenizer\n"
        f"({len(tokenizer)} tokens) trained on the same reviews; `{EOS_TOKEN}` is bos/eos/unk, there is no pad\n"
        "token, as in gpt-neox-20b.\n"
    )
    return f"{model.num_parameters():,} parameters, {len(tokenizer)} tokens, final train loss {loss:.2f}"


def _pretrain(model, blocks, generator) -> float:
    """Next-token prediction on random blocks with AdamW; returns the mean loss of the last 20 steps."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.01, betas=(0.9, 0.95))
    losses = []
    for step in range(PRETRAIN_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, PRETRAIN_STEPS, PRETRAIN_LR, warmup=20)
        batch = blocks[torch.randint(len(blocks), (PRETRAIN_BATCH,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])


# ---------------------------------------------------------------------------------------------------------------------
# 4. The reward: WordPiece tokenizer + tiny DistilBERT sentiment classifier
# ---------------------------------------------------------------------------------------------------------------------

WORDPIECE_VOCAB_SIZE = 2048
# ~5,000 examples seen: under half an epoch of the 12,000, enough for >= 99% test accuracy (sentiment here is
# carried by lexicon words); large batches for the same reason as the pretraining's.
CLASSIFIER_STEPS = 80
CLASSIFIER_BATCH, CLASSIFIER_MAX_LEN = 64, 128  # reviews are ~60 WordPiece tokens: 128 truncates almost none
CLASSIFIER_LR = 3e-3


def train_wordpiece_tokenizer(texts: Sequence[str]):
    """Lowercase WordPiece, saved as a DistilBertTokenizer: a different tokenizer from the policy's, as in the hub.

    The vocabulary is counted here rather than by `tokenizers`' WordPieceTrainer, which numbers its "##" pieces in
    hash-map order and so learns a different vocabulary on every run. The corpus has only ~700 distinct words, so
    it is every word seen twice or more, most frequent first, plus each character alone and as a "##" continuation
    (WordPiece's fallback: an unseen word is spelled out, never lost to [UNK]).
    """
    from tokenizers import normalizers, pre_tokenizers
    from transformers import DistilBertTokenizer

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(
        word for text in texts for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
    )
    chars = sorted({char for word in counts for char in word})
    words = [word for word in sorted(counts, key=lambda w: (-counts[w], w)) if counts[word] >= 2 and len(word) > 1]
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{char}" for char in chars), *words]
    vocab = {token: i for i, token in enumerate(tokens[:WORDPIECE_VOCAB_SIZE])}
    return DistilBertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=512)


def fragments(rng: random.Random, text: str, n: int) -> list[tuple[str, float]]:
    """`n` spans of 5-40 words of `text` (half of them prefixes, like a PPO prompt + response), with soft targets.

    A fragment's target is read from its own words, not the review's label: a span that holds only a contrasting
    sentence would otherwise be taught backwards. Fragments without sentiment words (most short prefixes are
    inside the neutral opener) get P(POSITIVE) = 0.5, so the reward is indifferent to neutral text instead of
    learning noise from it: PPO then gains only by writing sentiment, which is what the real reward rewards.
    """
    words = text.split()
    out = []
    for _ in range(n):
        length = rng.randint(5, min(40, len(words)))
        start = 0 if rng.random() < 0.5 else rng.randint(0, len(words) - length)
        span = " ".join(words[start : start + length])
        balance = cue_balance(span)
        out.append((span, 1.0 if balance > 0 else 0.0 if balance < 0 else 0.5))
    return out


def classifier_examples(rows: Sequence[dict], seed: int) -> list[tuple[str, float]]:
    """Whole reviews with their labels, and two fragments of each, as (text, P(POSITIVE)) pairs."""
    rng = random.Random(f"fragments-{seed}")
    examples = [(row["text"], float(row["label"])) for row in rows]
    for row in rows:
        examples.extend(fragments(rng, row["text"], 2))
    return examples


def build_reward(out: Path, imdb: Path, seed: int) -> str:
    import torch
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    rows = load_split(imdb, "train")
    tokenizer = train_wordpiece_tokenizer([row["text"] for row in rows])
    torch.manual_seed(seed)
    config = DistilBertConfig(
        vocab_size=len(tokenizer),
        dim=64,
        n_layers=2,
        n_heads=2,
        hidden_dim=256,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        id2label=dict(LABELS),
        label2id={name: i for i, name in LABELS.items()},
    )
    model = DistilBertForSequenceClassification(config)
    examples = classifier_examples(rows, seed)
    loss = _train_classifier(model, tokenizer, examples, torch.Generator().manual_seed(seed))
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "README.md").write_text(
        "# fixture:tiny-distilbert-imdb — stand-in for lvwerra/distilbert-imdb\n\n"
        f"Built by `rlhf.fixtures` (version {FIXTURES_VERSION}, seed {seed}); offline, for tests and the quickstart.\n"
        f"DistilBertForSequenceClassification, {model.num_parameters():,} parameters (dim 64, 2 layers), labels\n"
        "0 = NEGATIVE, 1 = POSITIVE (pick scores by label name). Trained on the `fixture:imdb` train reviews and on\n"
        "5-40 word fragments of them, so that it also scores short PPO texts. Own lowercase WordPiece tokenizer\n"
        f"({len(tokenizer)} tokens), not the policy's.\n"
    )
    return f"{model.num_parameters():,} parameters, {len(tokenizer)} tokens, final train loss {loss:.2f}"


def _train_classifier(model, tokenizer, examples: Sequence[tuple[str, float]], generator) -> float:
    """AdamW on soft-target cross-entropy (a hard label is the target 0.0 or 1.0); returns the last 20 steps' loss."""
    import torch

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=CLASSIFIER_LR, weight_decay=0.01)
    losses = []
    for step in range(CLASSIFIER_STEPS):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, CLASSIFIER_STEPS, CLASSIFIER_LR, warmup=20)
        picks = torch.randint(len(examples), (CLASSIFIER_BATCH,), generator=generator).tolist()
        batch = tokenizer(
            [examples[i][0] for i in picks],
            padding=True,
            truncation=True,
            max_length=CLASSIFIER_MAX_LEN,
            return_tensors="pt",
        )
        p_positive = torch.tensor([examples[i][1] for i in picks])
        targets = torch.stack([1 - p_positive, p_positive], dim=1)
        logits = model(**batch).logits
        loss = -(targets * torch.log_softmax(logits, dim=-1)).sum(-1).mean()
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    model.eval()
    return sum(losses[-20:]) / len(losses[-20:])
