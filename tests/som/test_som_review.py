"""Review of the parts around the scoring core: a saved state refused under other thresholds or
another peer reference, the litigation methods where the trailing months hold 0 units, ROC AUC
of a table without scores, and hostile text on the due-diligence page."""

from __future__ import annotations

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from click.testing import CliRunner

from gateway.cli import cli
from gateway.som.config import SomConfig
from gateway.som.evaluate import evaluate, roc_auc
from gateway.som.incremental import SomState, SomStateError
from gateway.som.peers import peer_reference
from gateway.som.rules import apply_all
from gateway.som.score import score_orders

from .conftest import lines, messy_history, monthly


def _som(home: Path, *args: str):
    return CliRunner().invoke(cli, ["--home", str(home), "som", *args], catch_exceptions=False)


# --- the saved state and its configuration --------------------------------------------------

@pytest.fixture(scope="module")
def history() -> tuple[pl.DataFrame, pl.DataFrame]:
    df = messy_history(customers=40, days=400, seed=21).sort("date", maintain_order=True)
    return df, peer_reference(df)


def test_a_state_saved_under_other_thresholds_is_refused_not_scored_with(history, tmp_path) -> None:
    """The state kept its thresholds but load took none to compare: a caller scoring under
    others (state.config set after loading) got scores of the old thresholds under the new
    name, equal to no batch run under either."""
    df, peers = history
    half = df.height // 2
    built = SomConfig(monthly_cap=2000, size_ratio=3.0)
    state = SomState(built, peers)
    state.extend(df[:half])
    path = tmp_path / "state.bin"
    state.save(path)

    current = SomConfig()
    with pytest.raises(SomStateError) as e:
        SomState.load(path, current, peers)
    assert e.value.code == "som_state_config_mismatch"
    assert "monthly_cap 2000" in e.value.message and "size_ratio 3.0" in e.value.message
    with pytest.raises(AttributeError):  # the thresholds cannot be swapped under the state
        state.config = current  # type: ignore[misc]

    # Under the thresholds it was built with, it goes on as the batch does.
    same = SomState.load(path, built, peers)
    got = same.update_many(df[half:])
    batch = score_orders(df, built, peers)
    assert [g.score for g in got] == batch["score"].to_list()[half:]
    assert [g.reasons for g in got] == batch["reasons"].to_list()[half:]
    assert any(g.flag for g in got)
    assert SomState.load(path).config == built  # without a config: the state's own


def test_a_state_of_another_peer_reference_is_refused(history, tmp_path) -> None:
    df, peers = history
    state = SomState(peers=peers)
    state.extend(df[:1000])
    path = tmp_path / "state.bin"
    state.save(path)
    other = peer_reference(df[:1000])
    assert not other.equals(peers)
    with pytest.raises(SomStateError) as e:
        SomState.load(path, SomConfig(), other)
    assert e.value.code == "som_state_peers_mismatch"
    without = SomState()
    without.save(tmp_path / "bare.bin")
    with pytest.raises(SomStateError) as e:  # saved with no reference at all
        SomState.load(tmp_path / "bare.bin", peers=peers)
    assert e.value.code == "som_state_peers_mismatch"
    assert SomState.load(path, SomConfig(), peers).peers.equals(peers)


def test_a_damaged_state_file_is_a_coded_refusal(history, tmp_path) -> None:
    """Truncated at any point, a byte flipped anywhere, or of another format: a code, never a
    traceback or a state that loads with other numbers."""
    df, peers = history
    state = SomState(peers=peers)
    state.extend(df[:800])
    data = state.to_bytes()
    path = tmp_path / "state.bin"
    rng = np.random.default_rng(0)
    for cut in (0, 5, 100, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(SomStateError) as e:
            SomState.load(path)
        assert e.value.code == "som_state_unreadable"
    for at in rng.integers(0, len(data), 60):
        bad = bytearray(data)
        bad[at] ^= 0x10
        path.write_bytes(bytes(bad))
        try:
            loaded = SomState.load(path)
        except SomStateError as e:
            assert e.code in ("som_state_unreadable", "som_state_version")
            continue
        assert loaded.to_bytes() == data  # a flip the format ignores (a zip header's spare bit)


# --- the litigation methods -----------------------------------------------------------------

C, F = "AB1234563", "oxycodone"


def test_trailing_months_of_zero_units_are_a_threshold_of_zero() -> None:
    """domain.md §6: above the trailing 6-month maximum, above 2x / 3x the trailing 12-month
    average, above the trailing daily maximum. A series back after 7 quiet months, or whose
    trailing months held orders of 0 units, has a maximum (and average) of 0 and any units are
    above it: they were scored 0 and never flagged."""
    back = apply_all(lines([(C, F, "2024-01-10", 1000), (C, F, "2024-09-10", 100)]))
    assert back["max6"]["flag"].to_list() == [False, True]
    assert back["daily_max"]["flag"].to_list() == [False, True]
    assert back["max6"]["score"][1] == float("inf")
    assert back["max6"]["reasons"][1] == ("oxycodone: 100 units this month above the trailing "
                                          "6-month maximum of 0")
    # January still within the 12 months: the average is 1000 / 8, not exceeded twice.
    assert not back["avg12x2"]["flag"][1]
    assert back["avg12x2"]["score"][1] == pytest.approx(100 / (2 * 1000 / 8))

    gone = apply_all(lines([(C, F, "2023-01-10", 1000), (C, F, "2024-03-10", 100)]))
    assert all(gone[m]["flag"].to_list() == [False, True]
               for m in ("max6", "avg12x2", "avg12x3", "daily_max"))

    zeros = apply_all(lines([(C, F, "2024-01-10", 0), (C, F, "2024-02-10", 0),
                             (C, F, "2024-02-11", 100)]))
    for m in ("max6", "avg12x2", "avg12x3", "daily_max"):
        assert zeros[m]["flag"].to_list() == [False, False, True], m  # 0 is not above 0
        assert zeros[m]["score"].to_list()[:2] == [0.0, 0.0], m


def test_edges_of_the_methods_by_hand() -> None:
    """Month boundaries in a leap year, a customer with one order, ties at the threshold."""
    leap = apply_all(lines([(C, F, "2024-01-31", 100), (C, F, "2024-02-01", 150),
                            (C, F, "2024-02-29", 100), (C, F, "2024-03-01", 1)]))
    assert leap["max6"]["score"].to_list()[1:] == [1.5, 2.5, 1 / 250]
    assert leap["daily_max"]["flag"].to_list() == [False, True, False, False]  # 100 = 100: a tie
    assert leap["avg12x2"]["flag"].to_list() == [False, False, True, False]  # 250 > 2 x 100

    one = apply_all(lines([(C, F, "2024-05-05", 9000)]))
    assert {m: o["flag"][0] for m, o in one.items()} == {
        "max6": False, "avg12x2": False, "avg12x3": False, "cap8000": True, "daily_max": False}

    ties = apply_all(lines([(C, F, "2024-01-10", 100), (C, F, "2024-02-10", 200),
                            (C, F, "2024-03-10", 450), (C, F, "2024-04-03", 8000),
                            (C, F, "2024-05-03", 8000.5)]))
    # March: 450 = 3 x 150 (average of January and February): not above
    assert ties["avg12x3"]["score"][2] == 1.0 and not ties["avg12x3"]["flag"][2]
    assert ties["cap8000"]["flag"].to_list()[3:] == [False, True]


# --- evaluate -------------------------------------------------------------------------------

def test_roc_auc_of_no_scores_is_undefined_not_one_half(tmp_path) -> None:
    """A scored table whose score column is all missing reported ROC AUC 0.500 for every kind
    (every pair a tie), a ranking the scores never made."""
    assert roc_auc([np.nan, np.nan, np.nan], [True, False, True]) is None
    assert roc_auc([np.nan, 0.2, np.nan], [True, False, True]) == 0.0  # missing ranks lowest
    assert roc_auc([1.0, 2.0], [True, True]) is None  # one class only

    table = lines(monthly(C, F, 1000, "2024-01", 6) + monthly("BB1234563", F, 500, "2024-01", 6))
    scored = score_orders(table).with_columns(
        (pl.col("customer") == C).alias("label"), pl.lit("size").alias("anomaly"),
        pl.lit(None, pl.Float64).alias("score"))
    path = tmp_path / "scored.parquet"
    scored.write_parquet(path)
    report = evaluate(scored, rule_sets=False)
    assert report.scorer.overall.roc_auc is None and report.scorer.kind("size").roc_auc is None
    result = _som(tmp_path / "home", "evaluate", str(path), "--json", "--no-rules")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["results"][0]["overall"]["roc_auc"] is None


# --- the due-diligence page -----------------------------------------------------------------

class _Tags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: set[str] = set()
        self.attrs: set[str] = set()

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.add(tag)
        self.attrs.update(name for name, _ in attrs)


def test_hostile_text_on_the_page_is_shown_not_obeyed(tmp_path) -> None:
    """Bidirectional controls in a customer id or family (U+202E turns "AB...EVIL" into another
    id on screen) went onto the page as they were; markup in every field is escaped; the page
    fetches nothing."""
    customer = '"><img src=x onerror=alert(1)>AB\u202eLIVE\x00'
    family = '</style><script>alert("f")</script>\u2067fam'
    rows = monthly(customer, family, 1000, "2024-01", 12) + [(customer, family, "2025-01-15", 9000)]
    peers = [r for k in range(6) for r in monthly(f"P{k}", family, 900 + k, "2024-01", 13)]
    table = lines(rows + peers, customer_type="<b onmouseover='x'>RETAIL</b>", state="O'H\"")
    source, scored, page = tmp_path / "in.parquet", tmp_path / "scored.csv", tmp_path / "p.html"
    table.write_parquet(source)
    home = tmp_path / "home"
    assert _som(home, "score", str(source), "--out", str(scored), "--quiet").exit_code == 0
    hit = pl.read_csv(scored, infer_schema=False).filter(pl.col("flag") == "true")
    assert hit.height == 1 and "<script>" in hit["reasons"][0]
    result = _som(home, "diligence", str(scored), "--order", hit["order_id"][0], "--line", "1",
                  "--out", str(page))
    assert result.exit_code == 0, result.output
    text = page.read_text(encoding="utf-8")
    parsed = _Tags()
    parsed.feed(text)
    assert not parsed.tags & {"script", "img", "b", "iframe", "link", "object"}
    assert not {a for a in parsed.attrs if a.startswith("on") or a in ("src", "href")}
    assert text.count("<style>") == 1 and text.count("</style>") == 1
    assert not set(text) & {"\u202e", "\u2067", "\x00"}
    assert "AB[U+202E]LIVE[U+0000]" in text and "[U+2067]fam" in text
    assert "&lt;script&gt;" in text and "O&#x27;H&quot;" in text

    missing = _som(home, "diligence", str(scored), "--order", "NOPE", "--line", "1",
                   "--out", str(tmp_path / "q.html"))
    assert missing.exit_code == 2
    assert json.loads(missing.stderr)["error"]["code"] == "som_line_not_found"
    assert not (tmp_path / "q.html").exists()
