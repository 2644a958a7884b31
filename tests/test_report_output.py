"""What a user sees where a run ends: the report wrapped to 100 columns, wide tables split
into column groups that each repeat the method column."""

from __future__ import annotations

from ropim.suite.terminal import terminal_text


def test_the_printed_report_fits_a_100_column_terminal():
    columns = [f"measure number {i} top-1 (%)" for i in range(12)]
    header = "| method | " + " | ".join(columns) + " |"
    rule = "|:--|" + "|".join(["--:"] * len(columns)) + "|"
    rows = [f"| {m} | " + " | ".join(["39.1 ± 1.9 (n=3)"] * len(columns)) + " |"
            for m in ("ropim", "random_init")]  # fmt: skip
    prose = "A sentence that goes on " * 20
    markdown = "\n".join(["# Title", "", prose, "", header, rule, *rows, "", "![f](f.png)"])
    text = terminal_text(markdown)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    assert "![" not in text and "A sentence that goes on" in text and "\n\n\n" not in text
    headers = [line for line in lines if line.startswith("method")]
    assert len(headers) >= 3  # split into groups, each starting with the method column
    assert sum(line.startswith("random_init") for line in lines) == len(headers)
    for name in columns:  # every column kept, whole
        assert name in text
