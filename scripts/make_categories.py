"""Write stimuli/categories.jsonl: 10 semantic categories x 12 words x 10 sentence frames = 1200 stimuli.

Run from anywhere: `python scripts/make_categories.py [OUTPUT]` (default: the committed file). The
output is deterministic, and a test holds the committed file equal to what this script writes.

Choices, and why:
- Common single words, lower-case, most of them one or two tokens in a GPT-2-style tokenizer, so the
  word's activations are not spread over many pieces. No word belongs to two categories (no
  "orange", no "saw").
- Every category uses the same frames, so the frame carries no information about the category.
- Frames treat the word as a word being mentioned ("spell X slowly"), which is grammatical for a
  noun, an adjective or a number alike, and put no article before it ("a"/"an" would give away how
  the word begins, and "a anger" is not English).
- The word sits at different places in the sentence, not always last. Frames contain none of the
  target words, so a word's first occurrence is the slot it was put in.
- group = the word, so every frame of a word lands on one side of a split.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script, import the checkout's mlxscan

from mlxscan.stimuli import StimulusSet  # noqa: E402

OUTPUT = ROOT / "stimuli" / "categories.jsonl"

CATEGORIES = {
    "animals": ["dog", "cat", "horse", "cow", "sheep", "lion", "tiger", "bear", "wolf", "rabbit", "mouse", "eagle"],
    "colors": ["red", "blue", "green", "yellow", "black", "white", "brown", "pink", "purple", "gray", "violet",
               "scarlet"],
    "numbers": ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve"],
    "foods": ["bread", "cheese", "rice", "apple", "soup", "pasta", "butter", "cake", "egg", "pizza", "banana",
              "potato"],
    "tools": ["hammer", "drill", "wrench", "shovel", "axe", "chisel", "pliers", "rake", "ladder", "scissors",
              "knife", "broom"],
    "body_parts": ["hand", "arm", "leg", "foot", "head", "eye", "nose", "mouth", "ear", "knee", "shoulder",
                   "finger"],
    "emotions": ["joy", "anger", "fear", "sadness", "grief", "pride", "shame", "disgust", "envy", "guilt",
                 "anxiety", "surprise"],
    "places": ["kitchen", "school", "beach", "park", "hospital", "library", "church", "airport", "forest",
               "market", "office", "garden"],
    "professions": ["doctor", "teacher", "nurse", "lawyer", "farmer", "baker", "pilot", "chef", "soldier",
                    "engineer", "plumber", "dentist"],
    "vehicles": ["car", "bus", "truck", "train", "bicycle", "boat", "ship", "plane", "taxi", "tractor",
                 "motorcycle", "helicopter"],
}

FRAMES = {
    "f01": "The next word is {word}.",
    "f02": "She wrote the word {word} on the board.",
    "f03": "The word {word} appeared twice in the story.",
    "f04": "He kept thinking about the word {word} all day.",
    "f05": "Please say {word} out loud.",
    "f06": "They asked me to spell {word} slowly.",
    "f07": "Write {word} at the top of the page.",
    "f08": "My favorite word this week is {word}.",
    "f09": "I heard someone whisper {word} in the hallway.",
    "f10": "You can find {word} in any dictionary.",
}


def records() -> list[dict]:
    """Category by category, word by word, frame by frame: a fixed order, so the file is reproducible."""
    return [{"text": frame.format(word=word), "word": word, "category": category, "frame": frame_id, "group": word}
            for category, words in CATEGORIES.items()
            for word in words
            for frame_id, frame in FRAMES.items()]


def build() -> StimulusSet:
    return StimulusSet.from_records(records())


def main(argv: list[str]) -> None:
    output = Path(argv[0]) if argv else OUTPUT  # another path is for checking the script without touching the file
    stimuli = build()
    output.write_text(stimuli.to_jsonl(), encoding="utf-8")
    print(f"wrote {len(stimuli)} stimuli ({len(CATEGORIES)} categories, {len(FRAMES)} frames) to {output}")


if __name__ == "__main__":
    main(sys.argv[1:])
