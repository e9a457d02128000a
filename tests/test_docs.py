"""The Python API page's example runs as written."""

import re
from pathlib import Path

import pytest

PAGE = Path(__file__).parent.parent / "docs" / "python-api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, re.S)


@pytest.mark.slow
@pytest.mark.quiet
def test_the_python_api_example_trains_answers_scores_and_explains_a_bad_record(capsys):
    example = python_blocks(PAGE.read_text())[0]
    exec(compile(example, str(PAGE), "exec"), {"__name__": "python_api_example"})

    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4  # quiet: only what the example prints
    before, after = map(float, re.findall(r"[\d.]+", printed[0])[-2:])
    assert after < before  # two steps at lr 3e-4 already lower it
    assert printed[1].startswith("answer: '")
    assert 0.0 <= float(printed[2].removeprefix("json score: ")) <= 1.0
    assert re.match(r"refused: .*/data/train\.jsonl:1: .*messages", printed[3])
