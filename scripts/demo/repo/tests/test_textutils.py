from textutils import slugify


def test_words_are_lowercased_and_joined_by_hyphens():
    assert slugify("Rate Limiting for Payments") == "rate-limiting-for-payments"


def test_punctuation_and_extra_spaces_are_dropped():
    assert slugify("  Hello,   World!  ") == "hello-world"
