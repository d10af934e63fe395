"""The one Markdown writer of tables (shadowlab/tables.py) and the tables of other layers written through it."""

from shadowlab.defenses.evaluate import ZooRow, crown_ibp_markdown, markdown, smoothing_markdown
from shadowlab.tables import markdown_table


def test_markdown_table_formats_and_missing_values():
    text = markdown_table([("a", "a", "pct"), ("b", "b", "2"), ("c", "c", "str")], [{"a": 0.5, "b": 1.234, "c": "x"},
                                                                                    {"a": None, "b": 2.0}])
    lines = text.splitlines()
    assert lines[0] == "| a | b | c |" and lines[1] == "|---|---|---|"
    assert lines[2] == "| 50.0% | 1.23 | x |" and lines[3] == "| - | 2.00 | - |"


def test_markdown_table_codes_and_functions():
    cols = [("p", "p", "pct0"), ("i", "i", "int"), ("f", "f", lambda v: f"<{v}>")]
    assert markdown_table(cols, [{"p": 0.256, "i": 3.0, "f": "z"}, {"f": None}]).splitlines()[2:] == [
        "| 26% | 3 | <z> |", "| - | - | - |"]


def test_zoo_tables_keep_their_cells():
    zoo = markdown([ZooRow("cnn", "cnn", "none", 0.0, 1234567, 0.8512, None, 0.85, True),
                    ZooRow("smooth", "resnet", "smoothing", 0.25, 2_000_000, 0.7, 0.6549, 0.75, False),
                    ZooRow("other", "cnn", "none", 0.0, 12, 0.5, None, None, None)], "caption")
    assert zoo.splitlines() == [
        "caption", "", "| model | defense | sigma | params | clean acc. | acc. under N(0, sigma^2) | target | met |",
        "|---|---|---|---|---|---|---|---|", "| cnn | none | 0.00 | 1.23M | 85.1% | - | >= 85% | yes |",
        "| smooth | smoothing | 0.25 | 2.00M | 70.0% | 65.5% | >= 75% | NO |",
        "| other | none | 0.00 | 0.00M | 50.0% | - | - | - |"]
    acc = {"0": 0.7, "0.25": 0.55, "0.5": 0.4, "0.75": 0.2549, "1": 0.0}
    smooth = smoothing_markdown([{"model": "s", "sigma": 0.25, "n": 1000, "certified_accuracy": acc,
                                  "mean_radius_correct": None}])
    assert smooth.splitlines()[0] == ("| model | sigma | n | cert. acc. r=0 | cert. acc. r=0.25 | cert. acc. r=0.5 | "
                                      "cert. acc. r=0.75 | cert. acc. r=1 | mean radius (correct) |")
    assert smooth.splitlines()[2] == "| s | 0.25 | 1000 | 70.0% | 55.0% | 40.0% | 25.5% | 0.0% | - |"
    crown = crown_ibp_markdown([{"model": "c", "eps": 2 / 255, "clean_error": 0.3, "pgd_error": 0.45,
                                 "ibp_verified_error": 0.6, "crown_ibp_verified_error": 0.55, "verified_error": 0.551}])
    assert crown.splitlines()[2] == "| c | 2/255 | 30.0% | 45.0% | 60.0% | 55.0% | 55.1% |"
