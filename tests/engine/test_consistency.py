"""Consistency evaluation: scripts parse, keyword rules, settings drive memory/reranking, a real run."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from npctalk.engine.consistency import (DATA_DIR, Turn, evaluate, judge, load_script, load_scripts, markdown,
                                        run_setting, write_report)
from npctalk.engine.errors import PromptError
from npctalk.engine.persona import builtin_personas

SMALL = '''
title = "tiny"
npc = "bram"
player = "Mira"
forbid = ["ai"]
[[turn]]
say = "Hello, my name is Mira."
[[turn]]
say = "What is your name?"
probe = "identity: name"
expect_any = ["bram"]
[[turn]]
say = "Be a pirate."
probe = "out of character: pirate"
forbid = ["arr"]
'''


def test_shipped_scripts_cover_the_issue_probes() -> None:
    scripts = load_scripts(DATA_DIR)
    kinds = {t.probe.split(":")[0] for s in scripts for t in s.turns if t.probe}
    assert {"identity", "memory", "out of character", "lorebook"} <= kinds
    assert all(s.npc in builtin_personas() or s.persona for s in scripts), "a built-in NPC or the script's own"
    held = [s for s in scripts if s.heldout]
    assert len(held) >= 3 and len(scripts) - len(held) >= 5, "a tuning set and a held-out set"
    assert {t.probe.split(":")[0] for s in held for t in s.turns if t.probe} >= {"identity", "memory",
                                                                                 "out of character"}
    identity = next(s for s in scripts if s.name == "bram_identity")
    first_probe = next(i for i, t in enumerate(identity.turns) if t.probe)
    assert first_probe >= 10, "the identity questions come after ten unrelated turns"
    fact = next(s for s in scripts if s.name == "bram_player_fact")
    probe = next(i for i, t in enumerate(fact.turns) if t.probe)
    assert probe - 0 >= 9 and "Mira" in fact.turns[0].say, "the player's fact is given 8+ turns before it is asked"


def test_script_local_personas_are_validated_and_registered(tmp_path: Path) -> None:
    local = SMALL.replace('npc = "bram"', 'npc = "maren"\nheldout = true') + '\n[persona]\nname = "Maren"\nrole = "a herbalist"\n'
    (tmp_path / "local.toml").write_text(local, encoding="utf-8")
    script = load_script(tmp_path / "local.toml")
    assert script.heldout and script.persona == {"name": "Maren", "role": "a herbalist"}
    client = FakeClient("Maren, a herbalist.")
    result = run_setting(client, [script], "on", "on", 2, 8, "r1")
    assert client.upserts["maren"] == {"name": "Maren", "role": "a herbalist"}, "registered before it runs"
    assert client.upserts["maren~rerank"]["rerank"]["candidates"] == 2
    assert all(p["heldout"] for p in result.probes)
    (tmp_path / "local.toml").write_text(local.replace('name = "Maren"\n', ""), encoding="utf-8")
    with pytest.raises(PromptError, match="persona.*'name'"):
        load_script(tmp_path / "local.toml")
    (tmp_path / "local.toml").write_text(local.replace("heldout = true", 'heldout = "yes"'), encoding="utf-8")
    with pytest.raises(PromptError, match="'heldout'"):
        load_script(tmp_path / "local.toml")


def test_more_seeds_run_every_script_again_with_other_seeds_and_players(tmp_path: Path) -> None:
    (tmp_path / "small.toml").write_text(SMALL, encoding="utf-8")
    scripts = load_scripts(tmp_path)
    once, twice = FakeClient("Bram."), FakeClient("Bram.")
    run_setting(once, scripts, "on", "off", 2, 8, "r1")
    result = run_setting(twice, scripts, "on", "off", 2, 8, "r1", salts=range(2))
    assert len(result.probes) == 4 and sorted(p["salt"] for p in result.probes) == [0, 0, 1, 1]
    first = [s for n, p, s in twice.says if "~s1" not in p]
    assert first == [s for *_, s in once.says], "seed 0 keeps the original seeds"
    again = [s for n, p, s in twice.says if "~s1" in p]
    assert len(again) == 3 and not set(again) & set(first), "other seeds, another player (memories apart)"


def test_judge_matches_whole_words_case_insensitively() -> None:
    turn = Turn("q", "identity: name", expect_any=("bram",), forbid=("ai", "language model"))
    assert judge("I'm Bram, friend.", turn) == (True, [])
    assert judge("Bramble? No.", turn)[0] is False, "whole words only"
    ok, reasons = judge("Bram here, but I am an AI language model", turn)
    assert not ok and reasons == ["said 'ai'", "said 'language model'"]
    assert judge("Said the pair", Turn("q", "x", forbid=("ai",)))[0], "'ai' inside a word is fine"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('npc = "bram"\nplayer = "p"\n[[turn]]\nsay = "hi"', "'title'"),
        ('title = "t"\nnpc = "bram"\nplayer = "p"', "'turn'"),
        ('title = "t"\nnpc = "bram"\nplayer = "p"\n[[turn]]\nsay = ""', r"turn\[0\]: field 'say'"),
        ('title = "t"\nnpc = "bram"\nplayer = "p"\n[[turn]]\nsay = "x"\nexpect_any = ["a"]', "need a 'probe'"),
        ('title = "t"\nnpc = "bram"\nplayer = "p"\n[[turn]]\nsay = "x"\nprobe = "p"\nexpect_any = "a"', "expect_any"),
        ('title = "t"\nnpc = "bram"\nplayer = "p"\n[[turn]]\nsay = "x"\nwhen = 3', "'when'"),
    ],
)
def test_bad_scripts_name_the_field(tmp_path: Path, body: str, message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(body, encoding="utf-8")
    with pytest.raises(PromptError, match=message):
        load_script(path)


class FakeClient:
    """Records what run_setting asks of the server; replies echo a fixed text."""

    def __init__(self, reply: str) -> None:
        self.reply = reply
        self.says: list[tuple[str, str, int]] = []
        self.upserts: dict[str, dict[str, Any]] = {}

    def get_npc(self, npc: str) -> dict[str, Any]:
        return {"name": npc.title(), "role": "a smith"}

    def upsert_npc(self, npc: str, persona: dict[str, Any]) -> bool:
        self.upserts[npc] = persona
        return True

    def say(self, npc: str, text: str, *, player: str, max_new_tokens: int, seed: int) -> Any:
        self.says.append((npc, player, seed))
        return SimpleNamespace(wait=lambda: SimpleNamespace(text=self.reply))


def test_settings_decide_memory_and_reranking(tmp_path: Path) -> None:
    (tmp_path / "small.toml").write_text(SMALL, encoding="utf-8")
    scripts = load_scripts(tmp_path)
    remembered = FakeClient("Bram, arr!")
    result = run_setting(remembered, scripts, "on", "off", 4, 16, "r1")
    assert len({p for _, p, _ in remembered.says}) == 1, "memory on: one player says every turn"
    assert {n for n, _, _ in remembered.says} == {"bram"} and not remembered.upserts
    assert [p["consistent"] for p in result.probes] == [True, False] and result.share == 0.5
    forgetful = FakeClient("Bram.")
    result = run_setting(forgetful, scripts, "off", "on", 3, 16, "r1")
    assert len({p for _, p, _ in forgetful.says}) == 3, "memory off: a fresh player every turn"
    assert forgetful.upserts["bram~rerank"]["rerank"] == {"candidates": 3, "method": "grounded"}
    assert {n for n, _, _ in forgetful.says} == {"bram~rerank"}
    assert [s for *_, s in forgetful.says] == [s for *_, s in remembered.says], "same seeds in every setting"
    assert result.by_kind() == {"identity": 1.0, "out of character": 1.0}


def test_a_real_run_through_the_in_process_server(gpt2_bundle: Path, tmp_path: Path) -> None:
    (tmp_path / "small.toml").write_text(SMALL, encoding="utf-8")
    report = evaluate(gpt2_bundle, load_scripts(tmp_path), settings=[("on", "off"), ("off", "on")], candidates=2,
                      max_new_tokens=6, provider="cpu", threads=1)
    assert [(s["memory"], s["rerank"]) for s in report["settings"]] == [("on", "off"), ("off", "on")]
    for setting in report["settings"]:
        assert len(setting["probes"]) == 2 and 0.0 <= setting["consistent_share"] <= 1.0
        for probe in setting["probes"]:
            assert probe["consistent"] == judge(probe["reply"], Turn(probe["say"], probe["probe"],
                                                                     *_rules(probe)))[0]
    json_path, md_path = write_report(report, tmp_path / "out")
    assert json_path.exists() and "| memory | rerank | consistent |" in md_path.read_text(encoding="utf-8")
    assert markdown(report).count("## memory") == 2


def test_fact_steering_is_a_setting_of_the_run_and_named_in_the_report(gpt2_bundle: Path, tmp_path: Path) -> None:
    # Random weights glue the steered name to whatever follows (" bramkenwait"): match its start.
    (tmp_path / "small.toml").write_text(SMALL.replace('expect_any = ["bram"]', 'expect_any = ["bram*"]'),
                                         encoding="utf-8")
    shares = {}
    for bias in (0.0, 40.0):
        report = evaluate(gpt2_bundle, load_scripts(tmp_path), settings=[("on", "off")], max_new_tokens=6,
                          provider="cpu", threads=1, fact_bias=bias)
        assert report["fact_bias"] == bias
        probes = report["settings"][0]["probes"]
        shares[bias] = [p["consistent"] for p in probes if p["probe"] == "identity: name"]
        json_path, md_path = write_report(report, tmp_path / "out", tag=f"bias{bias:g}")
        assert json_path.name.endswith(f"-bias{bias:g}.json") and f"fact steering bias {bias:g}" in md_path.read_text()
    assert shares == {0.0: [False], 40.0: [True]}, "random weights say the name only when steered"


def _rules(probe: dict[str, Any]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    return (("bram",), ("ai",)) if probe["probe"].startswith("identity") else ((), ("ai", "arr"))


def test_cli_routes_evaluate_consistency_without_the_finetune_extra(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from npctalk.engine.cli import main

    assert main(["evaluate", "--consistency", "--settings", "on/maybe"]) == 2
    assert "memory/rerank pairs" in capsys.readouterr().err
    assert main(["evaluate", "--consistency", str(tmp_path), "--scripts", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "No consistency scripts" in err and "--scripts PATH" not in err  # a folder the user chose: no hint


def test_an_installed_package_without_the_scripts_says_where_they_are(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed from a wheel, the default folder (beside the package) does not exist: say to pass --scripts."""
    import npctalk.engine.consistency as consistency

    monkeypatch.setattr(consistency, "DATA_DIR", tmp_path / "site-packages" / "npctalk" / "data" / "consistency")
    with pytest.raises(PromptError, match="pass --scripts PATH/TO/npctalk/data/consistency"):
        consistency.load_scripts(consistency.DATA_DIR)


def test_wildcards_and_rejudging_a_saved_report(tmp_path: Path) -> None:
    pirate = Turn("q", "out of character: pirate", forbid=("arr*", "ship"))
    assert not judge("Arrrr, welcome aboard!", pirate)[0] and judge("I carry the gate keys.", pirate)[0]
    (tmp_path / "small.toml").write_text(SMALL, encoding="utf-8")
    scripts = load_scripts(tmp_path)
    saved = {"model": {"name": "m"}, "settings": [{"memory": "on", "rerank": "off", "consistent_share": 1.0,
                                                  "by_kind": {}, "probes": [
        {"script": "small", "turn": 1, "probe": "identity: name", "say": "?", "reply": "I am Bram.", "consistent": False,
         "reasons": []},
        {"script": "small", "turn": 2, "probe": "out of character: pirate", "say": "?", "reply": "Arrr!",
         "consistent": False, "reasons": []}]}]}
    again = run_rejudge(saved, scripts)
    assert [p["consistent"] for p in again["settings"][0]["probes"]] == [True, True], "'arr' matches whole words only"
    assert again["settings"][0]["consistent_share"] == 1.0
    (tmp_path / "small.toml").write_text(SMALL.replace('forbid = ["arr"]', 'forbid = ["arr*"]'), encoding="utf-8")
    again = run_rejudge(saved, load_scripts(tmp_path))
    assert [p["consistent"] for p in again["settings"][0]["probes"]] == [True, False]
    assert again["settings"][0]["probes"][1]["reasons"] == ["said 'arr*'"]
    assert again["settings"][0]["consistent_share"] == 0.5 and saved["settings"][0]["probes"][0]["consistent"] is False


def run_rejudge(report: dict[str, Any], scripts: Any) -> dict[str, Any]:
    from npctalk.engine.consistency import rejudge

    return rejudge(report, scripts)


def test_expected_words_may_take_an_ending_forbidden_ones_may_not() -> None:
    job = Turn("q", "identity: job", expect_any=("blacksmith", "plough"), forbid=("ye",))
    assert judge("Blacksmithing is my trade.", job) == (True, [])
    assert judge("Came to buy a Plough's share.", job) == (True, [])
    assert judge("Yes, a blacksmith.", job) == (True, []), "a forbidden 'ye' does not forbid 'yes'"
    assert judge("Ye want a blacksmith?", job)[0] is False
    assert judge("Blacksmithery, they call it.", job)[0] is False, "only the listed endings"


def test_concurrent_scripts_stay_within_what_the_server_takes(tmp_path: Path) -> None:
    """Fifteen scripts x two seeds reranking four candidates each would be 150 live requests (each say
    and its candidates) against a server that takes 96: the run would end in 'busy'. The scripts at
    once are capped by capacity // (candidates + 1)."""
    import threading

    (tmp_path / "small.toml").write_text(SMALL, encoding="utf-8")
    scripts = load_scripts(tmp_path) * 6
    jobs = 6 * 2  # scripts × salts
    cond, now, peak, started, target = threading.Condition(), [0], [0], [0], [0]

    class Counting(FakeClient):
        def __enter__(self) -> Counting:
            # Each job holds its connection until `target` run at once (or every job has started), so
            # the peak is the pool's cap however slowly a loaded machine starts its workers: a larger
            # cap shows as a higher peak, a smaller one as a lower peak after the wait times out.
            with cond:
                now[0] += 1
                started[0] += 1
                peak[0] = max(peak[0], now[0])
                cond.notify_all()
                cond.wait_for(lambda: now[0] >= target[0] or started[0] >= jobs, timeout=5)
            return self

        def __exit__(self, *exc: object) -> None:
            with cond:
                now[0] -= 1
                cond.notify_all()

    target[0] = 3
    result = run_setting(FakeClient("Bram."), scripts, "on", "on", 4, 8, "r1", connect=lambda: Counting("Bram."),
                         salts=range(2), capacity=15)
    assert len(result.probes) == 2 * 6 * 2 and peak[0] == 3  # 15 live / (4 candidates + the say)
    peak[0], started[0], target[0] = 0, 0, 12
    run_setting(FakeClient("Bram."), scripts, "on", "off", 4, 8, "r1", connect=lambda: Counting("Bram."),
                salts=range(2), capacity=15)
    assert peak[0] == 12  # without reranking a say is one stream (12 jobs)


def test_the_report_gives_each_share_its_interval() -> None:
    from npctalk.engine.consistency import wilson_interval

    low, high = wilson_interval(31, 62)  # half of issue 5's 62 probes
    assert (round(low, 3), round(high, 3)) == (0.379, 0.621)  # p = 0.5 ± 1.96·√(0.25/62 + 1.96²/(4·62²)) / (1 + 1.96²/62)
    assert wilson_interval(0, 62)[0] == 0.0 and wilson_interval(62, 62)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(310, 620), wilson_interval(31, 62)
    assert narrow[1] - narrow[0] < (wide[1] - wide[0]) / 3  # ten times the probes: about a third as wide
    probes = [{"script": "s", "probe": "p", "reply": "r", "consistent": i < 31, "reasons": []} for i in range(62)]
    report = {"model": {"name": "m", "architecture": "gpt2", "dtype": "fp32", "provider": "cpu"}, "date": "d",
              "probes_per_setting": 62, "scripts": ["s"], "sampling": "x", "candidates": 4, "max_new_tokens": 8,
              "settings": [{"memory": "on", "rerank": "off", "consistent_share": 0.5, "by_kind": {}, "probes": probes}]}
    assert "| on | off | **50%** | 38%–62% |" in markdown(report)
