"""The README tells the truth: every accuracy and time it quotes is held by a result file the benchmark scripts
write (benchmarks/results/*.json), and its sample output of the quickstart is the output benchmarks/quickstart.py
recorded. A figure typed in by hand, or left behind when a result was measured again, fails here."""
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _numbers(obj) -> set[float]:
    """Every number in a JSON document, as it is and as a percentage, rounded to 0, 1 and 2 decimals."""
    out: set[float] = set()
    stack = [obj]
    while stack:
        o = stack.pop()
        if isinstance(o, dict):
            stack.extend(o.values())
        elif isinstance(o, list):
            stack.extend(o)
        elif isinstance(o, (int, float)) and not isinstance(o, bool):
            out |= {round(v, d) for v in (o, 100 * o) for d in (0, 1, 2)}
    return out


def _results() -> set[float]:
    found: set[float] = set()
    for path in (ROOT / "benchmarks" / "results").glob("*.json"):
        found |= _numbers(json.loads(path.read_text(encoding="utf-8")))
    return found


def _quoted() -> set[str]:
    """The README's measured figures: percentages (also the members of 'a / b / c %' lists) and seconds."""
    percent = re.findall(r"(\d+\.\d+)(?= ?%| / \d)", README)
    seconds = re.findall(r"(?<![\d.])(\d[\d,]*(?:\.\d+)?) ?s(?:\b| of| training)", README)
    return {f.replace(",", "") for f in percent + seconds}


def test_every_figure_the_readme_quotes_is_in_a_result_file():
    held = _results()
    quoted = _quoted()
    assert len(quoted) > 20, "the patterns no longer find the README's figures"
    missing = sorted((f for f in quoted if float(f) not in held), key=float)
    assert not missing, f"figures in README.md that no benchmarks/results/*.json holds: {missing}"


def test_the_sample_output_is_what_the_quickstart_printed():
    recorded = json.loads((ROOT / "benchmarks" / "results" / "quickstart.json").read_text(encoding="utf-8"))
    sample = README.split("saved:\n\n```\n", 1)[1].split("```", 1)[0]
    lines = [line for line in sample.splitlines() if line.strip() and line.strip() != "..."]
    assert len(lines) >= 3
    for line in lines:
        assert line in recorded["output"], f"not in benchmarks/results/quickstart.json's output: {line}"
