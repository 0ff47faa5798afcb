"""Persona consistency evaluation: scripted conversations, keyword rules per probe, share consistent.

A script (``data/consistency/*.toml``)::

    title = "Bram: name, job and home after ten unrelated turns"
    npc = "bram"                      # an NPC the server knows (built-in, or a card in the personas)
    player = "Mira"
    heldout = false                   # true: never used to tune the engine; reported as its own split
    forbid = ["ai", "language model"] # forbidden in every probe of this script
    [persona]                         # optional script-local persona (persona.py fields), registered
    name = "Maren"                    # under ``npc`` before the script runs
    role = "the herbalist of Thornwick"
    [[turn]]
    say = "Lovely weather today."     # a plain turn
    [[turn]]
    say = "What is your name?"
    probe = "identity: name"          # a probe: its reply is judged
    expect_any = ["bram"]             # at least one must occur (optional)
    forbid = ["arr"]                  # none may occur (added to the script's)

Words match whole, case-insensitively; a trailing ``*`` matches any ending (``"arr*"``). A probe is
*consistent* when its expectations hold. ``rejudge`` applies the current rules to a saved report's
replies (the replies themselves are reproducible: fixed seeds).

The conversations run through the real serving path, in process: a ``server.Server`` (prefix cache,
memory store in SQLite ``:memory:``, continuous batching, reranked says) on a loopback port, driven
by ``npctalk.client.Client``. Each setting is one cell of memory × reranking:

* memory ``on``  — every turn of a script is said by the same player, so the server's memory (recent
  turns, facts, summary) carries the conversation; ``off`` — every turn comes from a fresh player
  id, so each line is answered with no memory at all;
* rerank ``on``  — the NPC is registered again with ``rerank = {candidates: N}``; ``off`` as is.

Sampling uses the server's defaults with a fixed seed per turn, so a run is reproducible. The report
(JSON + markdown) gives the share consistent per setting, per probe kind, and every probe's reply.
Torch-free.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import re
import threading
import time
import tomllib
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, PromptError
from .rerank import RerankConfig

log = logging.getLogger(__name__)

DATA_DIR = Path(__file__).resolve().parent.parent / "data" / "consistency"
RERANK_METHOD = RerankConfig().method  # the rerank-on settings score candidates the default way
SETTINGS = (("on", "off"), ("off", "off"), ("on", "on"), ("off", "on"))  # (memory, rerank)


@dataclass(frozen=True)
class Turn:
    """One player line; a probe when ``probe`` names it."""

    say: str
    probe: str = ""
    expect_any: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()


@dataclass(frozen=True)
class Script:
    title: str
    npc: str
    player: str
    turns: tuple[Turn, ...]
    name: str = ""
    heldout: bool = False
    persona: dict[str, Any] | None = field(default=None, hash=False, compare=False)

    @property
    def probes(self) -> int:
        return sum(1 for t in self.turns if t.probe)


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise PromptError(f"{where} must be a list of non-empty strings.")
    return tuple(v.strip().lower() for v in value)


def load_script(path: str | Path) -> Script:
    """Read one script; ``PromptError`` naming the file and the bad field."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PromptError(f"{path}: cannot read the consistency script: {exc}.") from exc
    for name in ("title", "npc", "player"):
        if not isinstance(data.get(name), str) or not data[name].strip():
            raise PromptError(f"{path}: field '{name}' is required and must be a non-empty string.")
    shared = _strings(data.get("forbid", []), f"{path}: field 'forbid'")
    heldout = data.get("heldout", False)
    if not isinstance(heldout, bool):
        raise PromptError(f"{path}: field 'heldout' must be true or false, got {heldout!r}.")
    persona = data.get("persona")
    if persona is not None:
        from .persona import Persona

        Persona.from_dict(persona, source=f"{path}: field 'persona'")  # PromptError naming the bad field
    unknown = sorted(set(data) - {"title", "npc", "player", "forbid", "heldout", "persona", "turn"})
    if unknown:
        raise PromptError(f"{path}: unknown field(s) {unknown}.")
    raw = data.get("turn")
    if not isinstance(raw, list) or not raw:
        raise PromptError(f"{path}: field 'turn' must be a non-empty array of tables ([[turn]]).")
    turns = []
    for i, item in enumerate(raw):
        where = f"{path}: turn[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("say"), str) or not item["say"].strip():
            raise PromptError(f"{where}: field 'say' is required and must be a non-empty string.")
        unknown = sorted(set(item) - {"say", "probe", "expect_any", "forbid"})
        if unknown:
            raise PromptError(f"{where}: unknown field(s) {unknown}.")
        probe = item.get("probe", "")
        if not isinstance(probe, str):
            raise PromptError(f"{where}: field 'probe' must be a string.")
        expect = _strings(item.get("expect_any", []), f"{where}: field 'expect_any'")
        forbid = _strings(item.get("forbid", []), f"{where}: field 'forbid'")
        if (expect or forbid) and not probe:
            raise PromptError(f"{where}: 'expect_any'/'forbid' need a 'probe' name.")
        turns.append(Turn(item["say"].strip(), probe.strip(), expect, (shared + forbid) if probe else ()))
    return Script(data["title"].strip(), data["npc"].strip(), data["player"].strip(), tuple(turns), path.stem,
                  heldout, dict(persona) if persona is not None else None)


def load_scripts(folder: str | Path = DATA_DIR) -> list[Script]:
    paths = sorted(Path(folder).glob("*.toml"))
    if not paths:
        hint = (" The scripts live in the repository's data/consistency/ (an installed package does not carry "
                "them): pass --scripts PATH/TO/npctalk/data/consistency." if Path(folder) == DATA_DIR else "")
        raise PromptError(f"No consistency scripts (*.toml) in {folder}.{hint}")
    return [load_script(p) for p in paths]


# Endings an expected word may take and still state the fact ("blacksmithing", "Plough's", "herbs").
INFLECTIONS = r"(?:s|es|'s|ing|ed)?"


def _has(text: str, word: str, inflected: bool = False) -> bool:
    """``word`` occurs whole in ``text``; a trailing ``*`` matches any ending (``arr*``: arr, arrr, …);
    ``inflected`` also accepts ``INFLECTIONS`` (expected words only: a forbidden "ye" must not
    forbid "yes")."""
    stem, wild = (word[:-1], True) if word.endswith("*") else (word, False)
    tail = r"\w*" if wild else (INFLECTIONS if inflected else "") + r"(?![\w'])"
    return re.search(rf"(?<![\w']){re.escape(stem)}{tail}", text) is not None


def judge(reply: str, turn: Turn) -> tuple[bool, list[str]]:
    """(consistent, reasons) of one probe's reply under its keyword rules."""
    text = reply.lower()
    reasons = [f"said {w!r}" for w in turn.forbid if _has(text, w)]
    if turn.expect_any and not any(_has(text, w, inflected=True) for w in turn.expect_any):
        reasons.append(f"none of {list(turn.expect_any)}")
    return not reasons, reasons


@dataclass
class SettingResult:
    memory: str
    rerank: str
    probes: list[dict[str, Any]] = field(default_factory=list)

    @property
    def share(self) -> float:
        return sum(p["consistent"] for p in self.probes) / max(1, len(self.probes))

    def by_kind(self) -> dict[str, float]:
        kinds: dict[str, list[bool]] = {}
        for p in self.probes:
            kinds.setdefault(p["probe"].split(":")[0], []).append(p["consistent"])
        return {k: sum(v) / len(v) for k, v in sorted(kinds.items())}


def _seed(*parts: str) -> int:
    return zlib.crc32("\x00".join(parts).encode())


def run_script(client: Any, script: Script, memory: str, rerank: str, candidates: int, max_new_tokens: int,
               run_id: str, salt: int = 0) -> list[dict[str, Any]]:
    """Say one script's turns through ``client`` under one setting; its judged probes. ``salt`` picks
    another fixed seed per turn (0: the original seeds) and another player, so repeats stay apart."""
    npc = script.npc
    if script.persona is not None:  # a script-local persona: registered (again) before the script runs
        client.upsert_npc(npc, script.persona)
    if rerank == "on":
        npc = f"{script.npc}~rerank"
        persona = {**client.get_npc(script.npc), "rerank": {"candidates": candidates, "method": RERANK_METHOD}}
        client.upsert_npc(npc, persona)
    probes = []
    for index, turn in enumerate(script.turns):
        player = f"{script.player}~{run_id}~{memory}{rerank}" + (f"~s{salt}" if salt else "") \
            + ("" if memory == "on" else f"~{index}")
        reply = client.say(npc, turn.say, player=player, max_new_tokens=max_new_tokens,
                           seed=_seed(script.name, str(index), *([str(salt)] if salt else []))).wait()
        if turn.probe:
            ok, reasons = judge(reply.text, turn)
            probes.append({"script": script.name, "turn": index, "probe": turn.probe, "say": turn.say,
                           "reply": reply.text, "consistent": ok, "reasons": reasons, "heldout": script.heldout,
                           "salt": salt})
    log.info("%s (memory %s, rerank %s): done", script.name, memory, rerank)
    return probes


def run_setting(client: Any, scripts: Sequence[Script], memory: str, rerank: str, candidates: int,
                max_new_tokens: int, run_id: str, *, connect: Callable[[], Any] | None = None,
                salts: Sequence[int] = (0,), capacity: int = 96) -> SettingResult:
    """Say every script's turns; judge the probes. With ``connect`` (a factory of clients), the scripts
    run concurrently, one client each, so the server batches them (replies stay seeded per turn); at
    most as many at once as the server's ``capacity`` (streams running + queued) takes, counting a
    reranked say as its ``candidates`` streams and itself, so no say is refused as ``busy``."""
    result = SettingResult(memory, rerank)
    jobs = [(script, salt) for salt in salts for script in scripts]
    if connect is None:
        for script, salt in jobs:
            result.probes += run_script(client, script, memory, rerank, candidates, max_new_tokens, run_id, salt)
        return result

    def one(job: tuple[Script, int]) -> list[dict[str, Any]]:
        with connect() as own:
            return run_script(own, job[0], memory, rerank, candidates, max_new_tokens, run_id, job[1])

    streams = candidates + 1 if rerank == "on" else 1  # a reranked say is live itself, and so is each candidate
    with ThreadPoolExecutor(max_workers=max(1, min(len(jobs), capacity // streams))) as pool:
        for probes in pool.map(one, jobs):
            result.probes += probes
    return result


def _split(probes: Sequence[dict[str, Any]], heldout: bool) -> float | None:
    chosen = [p["consistent"] for p in probes if bool(p.get("heldout", False)) == heldout]
    return round(sum(chosen) / len(chosen), 3) if chosen else None


def summarize(result: SettingResult) -> dict[str, Any]:
    """One setting of the report: overall share, the tuning and held-out splits, per probe kind."""
    return {"memory": result.memory, "rerank": result.rerank, "consistent_share": round(result.share, 3),
            "tuning_share": _split(result.probes, False), "heldout_share": _split(result.probes, True),
            "by_kind": {k: round(v, 3) for k, v in result.by_kind().items()}, "probes": result.probes}


def evaluate(bundle: str | Path, scripts: Sequence[Script], *, settings: Sequence[tuple[str, str]] = SETTINGS,
             candidates: int = 4, max_new_tokens: int = 48, provider: str = "auto",
             threads: int | None = None, concurrent: bool = True, seeds: int = 1,
             fact_bias: float | None = None,
             checkpoint: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run every setting on one bundle through an in-process server; the report as a dict.
    ``concurrent``: the scripts of a setting talk to the server at once (batched decoding);
    ``seeds``: each script is run that many times per setting with other fixed seeds (shares pool them);
    ``fact_bias``: the server's fact steering bias (None: the server default; 0: off);
    ``checkpoint``: called with the report so far after each setting (a long run that fails later
    keeps the settings it finished)."""
    from npctalk.client import Client

    from .memory import MemoryConfig
    from .server import Server, ServerConfig, load_model

    if seeds < 1:
        raise ConfigError(f"seeds must be at least 1, got {seeds}.")
    if candidates < 2 and any(r == "on" for _, r in settings):
        raise ConfigError(f"Reranking needs at least 2 candidates, got {candidates}.")
    config = ServerConfig(bind="tcp://127.0.0.1:*", memory=MemoryConfig(path=":memory:"), request_timeout_s=600.0,
                          client_timeout_s=600.0, max_new_tokens=max(max_new_tokens, 64))
    model, config = load_model(Path(bundle), config, provider=provider, intra_op_threads=threads)
    if fact_bias is not None:
        config = dataclasses.replace(config, defaults=dataclasses.replace(config.defaults, fact_bias=fact_bias))
    server = Server(model, config)
    thread = threading.Thread(target=server.run, name="consistency-server", daemon=True)
    thread.start()
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%H%M%S")
    results: list[SettingResult] = []
    started = time.perf_counter()

    def report() -> dict[str, Any]:
        m = model.manifest
        return {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "model": {"name": m.name, "architecture": m.architecture, "dtype": m.dtype, "provider": model.provider},
            "machine": machine(), "wall_s": round(time.perf_counter() - started, 1),
            "scripts": [s.name for s in scripts], "heldout_scripts": [s.name for s in scripts if s.heldout],
            "probes_per_setting": sum(s.probes for s in scripts) * seeds, "seeds": seeds,
            "candidates": candidates, "rerank_method": RERANK_METHOD, "max_new_tokens": max_new_tokens,
            "fact_bias": config.defaults.fact_bias,
            "sampling": "server defaults, fixed seed per turn" + (f", {seeds} seeds" if seeds > 1 else ""),
            "settings": [summarize(r) for r in results],
        }

    try:
        def connect() -> Any:
            return Client(server.endpoint, timeout=600.0)

        with connect() as client:
            for memory, rerank in settings:
                results.append(run_setting(client, scripts, memory, rerank, candidates, max_new_tokens, run_id,
                                           connect=connect if concurrent else None, salts=range(seeds),
                                           capacity=config.scheduler.max_batch + config.scheduler.max_queue))
                if checkpoint is not None and len(results) < len(settings):
                    checkpoint(report())
    finally:
        server.request_stop()
        thread.join(60)
    return report()


def machine() -> dict[str, Any]:
    """Where the run happened: host CPU count and the load average at the end (other jobs share CPUs)."""
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "load_average_1_5_15": [round(x, 2) for x in load]}


def rejudge(report: dict[str, Any], scripts: Sequence[Script]) -> dict[str, Any]:
    """``report`` with every probe judged again under ``scripts``' current rules (same replies)."""
    turns = {(s.name, i): t for s in scripts for i, t in enumerate(s.turns)}  # same rules for every seed
    settings = []
    for setting in report["settings"]:
        result = SettingResult(setting["memory"], setting["rerank"])
        for probe in setting["probes"]:
            turn = turns[(probe["script"], probe["turn"])]
            ok, reasons = judge(probe["reply"], turn)
            result.probes.append({**probe, "consistent": ok, "reasons": reasons,
                                  "heldout": next(s.heldout for s in scripts if s.name == probe["script"])})
        settings.append({**setting, **summarize(result)})
    return {**report, "settings": settings}


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}"


def wilson_interval(hits: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95 % Wilson score interval of a share of ``hits`` in ``n`` probes ((0, 1) for none): how far
    a share of 62 probes can move by chance, before two reports are compared."""
    if n <= 0:
        return 0.0, 1.0
    share = hits / n
    centre = (share + z * z / (2 * n)) / (1 + z * z / n)
    half = z * (share * (1 - share) / n + z * z / (4 * n * n)) ** 0.5 / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval(setting: dict[str, Any]) -> str:
    probes = setting["probes"]
    low, high = wilson_interval(sum(1 for p in probes if p["consistent"]), len(probes))
    return f"{low:.0%}–{high:.0%}"


def markdown(report: dict[str, Any]) -> str:
    """The report as a markdown page: the share table (all, tuning, held-out, per kind), then every reply."""
    m = report["model"]
    kinds = sorted({k for s in report["settings"] for k in s["by_kind"]})
    held = report.get("heldout_scripts", [])
    where = report.get("machine")
    lines = [f"# Persona consistency: {m['name']} ({m['architecture']}, {m['dtype']}, {m['provider']})", "",
             f"{report['date']} · {report['probes_per_setting']} probes per setting from {len(report['scripts'])} "
             f"scripts ({', '.join(report['scripts'])}) · {report['sampling']} · reranking: "
             f"{report['candidates']} candidates ({report.get('rerank_method', 'both')}) · "
             f"up to {report['max_new_tokens']} new tokens"
             + (f" · fact steering bias {report['fact_bias']:g}" if "fact_bias" in report else ""), ""]
    if held:
        lines += [f"Held out (never used to tune the engine): {', '.join(held)}.", ""]
    if where:
        lines += [f"Machine: {where['platform']}, {where['cpus']} CPUs, load average (1/5/15 min) at the end "
                  f"{' / '.join(map(str, where['load_average_1_5_15']))}; wall {report.get('wall_s', '?')} s.", ""]
    lines += ["| memory | rerank | consistent | 95 % interval | tuning | held out | " + " | ".join(kinds) + " |",
              "|---|---|---:|---:|---:|---:|" + "---:|" * len(kinds)]
    for s in report["settings"]:
        cells = " | ".join(f"{s['by_kind'].get(k, float('nan')):.0%}" for k in kinds)
        lines.append(f"| {s['memory']} | {s['rerank']} | **{s['consistent_share']:.0%}** | {_interval(s)} | "
                     f"{_pct(s.get('tuning_share'))} | {_pct(s.get('heldout_share'))} | {cells} |")
    for s in report["settings"]:
        lines += ["", f"## memory {s['memory']}, rerank {s['rerank']}", "", "| script | probe | reply | ok |",
                  "|---|---|---|---|"]
        for p in s["probes"]:
            reply = p["reply"].replace("|", "\\|").replace("\n", " ")
            verdict = "yes" if p["consistent"] else "no: " + "; ".join(p["reasons"])
            lines.append(f"| {p['script']} | {p['probe']} | {reply} | {verdict} |")
    return "\n".join(lines) + "\n"


def write_report(report: dict[str, Any], out: str | Path, tag: str = "") -> tuple[Path, Path]:
    """``consistency-MODEL-DATE[-TAG].json`` and ``.md`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"consistency-{report['model']['name']}-{report['date'][:10]}" + (f"-{tag}" if tag else "")
    json_path, md_path = out / f"{stem}.json", out / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    md_path.write_text(markdown(report), encoding="utf-8")
    return json_path, md_path
