"""Mock skin analysis: a pure, deterministic function of the image id."""

import hashlib
import re

SKIN_TYPES = ("Normal", "Dry", "Oily", "Combination", "Sensitive")

# The catalogue order is the order issues are reported in.
ISSUES = (
    "Acne",
    "Hyperpigmentation",
    "Redness",
    "Wrinkles",
    "Enlarged Pores",
    "Dark Circles",
    "Dehydration",
    "Uneven Texture",
)

# Issues a dermatologist would not be surprised to see with each skin type.
PLAUSIBLE_ISSUES = {
    "Normal": ("Hyperpigmentation", "Wrinkles", "Dark Circles", "Uneven Texture"),
    "Dry": ("Redness", "Wrinkles", "Dark Circles", "Dehydration", "Uneven Texture"),
    "Oily": ("Acne", "Hyperpigmentation", "Enlarged Pores", "Uneven Texture"),
    "Combination": ("Acne", "Hyperpigmentation", "Enlarged Pores", "Dehydration", "Uneven Texture"),
    "Sensitive": ("Acne", "Redness", "Dehydration", "Uneven Texture"),
}

MAX_ISSUES = 3
MIN_CONFIDENCE_PERCENT = 70
MAX_CONFIDENCE_PERCENT = 99

FIXTURE_ID = re.compile(
    r"mock_(?P<skin_type>%s)(?:_[a-z0-9]+(?:[_-][a-z0-9]+)*)?"
    % "|".join(skin_type.lower() for skin_type in SKIN_TYPES)
)
MAX_FIXTURE_ID_LENGTH = 64


def fixture_skin_type(image_id):
    """Return the skin type a fixture id such as ``mock_dry_2`` asks for, or None."""
    if len(image_id) > MAX_FIXTURE_ID_LENGTH:
        return None
    match = FIXTURE_ID.fullmatch(image_id)
    return match["skin_type"].capitalize() if match else None


def analyze(image_id):
    """Return the mock analysis of ``image_id``; the same id always gets the same result."""
    digest = hashlib.sha256(image_id.encode()).digest()
    # Disjoint slices of the digest drive each choice, so they vary independently.
    skin_type = fixture_skin_type(image_id) or SKIN_TYPES[_number(digest[0:8]) % len(SKIN_TYPES)]
    count = _number(digest[8:16]) % (MAX_ISSUES + 1)
    candidates = PLAUSIBLE_ISSUES[skin_type]
    # Rank the plausible issues by a per-issue digest: a deterministic shuffle.
    ranked = sorted(candidates, key=lambda issue: hashlib.sha256(digest + issue.encode()).digest())
    chosen = set(ranked[:count])
    span = MAX_CONFIDENCE_PERCENT - MIN_CONFIDENCE_PERCENT + 1
    percent = MIN_CONFIDENCE_PERCENT + _number(digest[16:24]) % span
    return {
        "image_id": image_id,
        "skin_type": skin_type,
        "issues": [issue for issue in ISSUES if issue in chosen],
        "confidence": percent / 100,
    }


def _number(chunk):
    return int.from_bytes(chunk, "big")
