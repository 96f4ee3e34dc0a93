"""Variants of hostile challenge files: YAML that builds values the file does not show (tags,
merge keys), values past a parser's own limits (nesting, 5,000-digit integers), and text
that would act on a terminal (escapes, invisible direction marks). Each is a ChallengeError
naming its line or field, never another exception, and nothing is registered."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine.challenges import ChallengeError, load_challenge

BASE = """\
id: hostile
title: Hostile
task: classification
output: {kind: probabilities, filename: predictions.csv}
ranking: {metrics: [{metric: roc_auc}]}
phases:
  - id: test
    dataset: {path: data}
"""


def _load(tmp_path: Path, text: str):
    path = tmp_path / "challenge.yaml"
    path.write_text(text, encoding="utf-8")
    return load_challenge(path)


def test_the_base_file_loads(tmp_path):
    assert _load(tmp_path, BASE).title == "Hostile"


@pytest.mark.parametrize(("old", "new", "line"), [
    ("title: Hostile", "title: !!python/object/apply:os.system ['true']", 2),
    ("title: Hostile", "title: !!binary SG9zdGlsZQ==", 2),
    ("title: Hostile", "title: !!set {a, b}", 2),
    ("title: Hostile", "title: !custom Hostile", 2),
    ("    dataset: {path: data}", "    dataset: !!map {path: data}", 8),
])
def test_yaml_tags_are_refused_by_line(tmp_path, old, new, line):
    with pytest.raises(ChallengeError) as refused:
        _load(tmp_path, BASE.replace(old, new))
    assert str(refused.value) == (f"line {line}: YAML tags (!, !!) are not supported in "
                                  "challenge files: write the plain value")


@pytest.mark.parametrize(("old", "new", "line"), [
    # the merged id is silently overridden by the one written: which one counts is unclear
    ("task: classification", "task: classification\n<<: {id: other}", 4),
    ("  - id: test", "  - <<: {id: test}\n    title: merged", 7),
])
def test_merge_keys_are_refused_by_line(tmp_path, old, new, line):
    with pytest.raises(ChallengeError) as refused:
        _load(tmp_path, BASE.replace(old, new))
    assert str(refused.value) == (f"line {line}: merge keys (<<) are not supported in "
                                  "challenge files: write each key once")


def test_a_file_nested_too_deeply_is_a_challenge_error(tmp_path):
    with pytest.raises(ChallengeError) as refused:
        _load(tmp_path, BASE.replace("title: Hostile", "title: " + "[" * 5000 + "]" * 5000))
    assert str(refused.value) == "challenge.yaml: nested too deeply to be a challenge file"


def test_an_integer_past_pythons_digit_limit_is_a_challenge_error(tmp_path):
    with pytest.raises(ChallengeError) as refused:
        _load(tmp_path, BASE + "    cases_per_run: 1" + "0" * 5000 + "\n")
    assert str(refused.value).startswith("challenge.yaml: a value cannot be read (Exceeds the "
                                         "limit (4300 digits)")


@pytest.mark.parametrize(("old", "new", "where", "shown"), [
    ("title: Hostile", 'title: "Clear\\x1b[2Jscreen"', "line 2, title", "'Clear\\x1b[2Jscreen'"),
    ("title: Hostile", 'title: "evil\\u202etxt.exe"', "line 2, title", "'evil\\u202etxt.exe'"),
    ("title: Hostile", 'title: "two\\nlines"', "line 2, title", "'two\\nlines'"),
    ("  - id: test", '  - id: test\n    title: "\\x1b]0;owned\\x07"', "line 8, phases[0].title",
     "'\\x1b]0;owned\\x07'"),
])
def test_text_with_control_or_invisible_characters_is_refused(tmp_path, old, new, where,
                                                               shown):
    with pytest.raises(ChallengeError) as refused:
        _load(tmp_path, BASE.replace(old, new))
    assert str(refused.value) == (f"challenge.yaml, {where}: {shown} holds a control or "
                                  "invisible character")


def test_rich_markup_in_a_title_is_kept_as_text(tmp_path):
    """Brackets are ordinary characters: the title is printed escaped, never interpreted."""
    title = "[bold red]Liver[/] [link=http://x]CT[/link]"
    assert _load(tmp_path, BASE.replace("title: Hostile", f"title: '{title}'")).title == title
