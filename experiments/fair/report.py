"""report.md of the fair comparison: setup, constants, headline ratios, targets with numbers."""

from __future__ import annotations

from pathlib import Path

from probe.sim.fair import __doc__ as FAIR_DOC

TARGET_TEXT = {
    "T1_never_below_best_baseline": "PROBE-on-EPLB never below 1.00x the best baseline "
                                    "(static, EPLB stop-the-world, EPLB async, EPLB + LP)",
    "T2_80pct_of_oracle_gain_shift_repeat": "on shift and repeat, at least 80% of the oracle's "
                                            "gain over the best baseline",
    "T2b_same_where_oracle_gain_2pct": "the same, only where the oracle gains at least 2% "
                                       "(below that the captured fraction divides by noise)",
    "T3_1.10x_where_oracle_1.15x": "at least 1.10x the best baseline wherever the oracle "
                                   "reaches 1.15x",
    "T4_tenth_of_eplb_lp_memory_on_shift": "on shift, at most a tenth of EPLB + LP's replica "
                                           "memory to come within 2% of the oracle",
}


def _breakdown(entry: dict, rule: str, best: str, mode: str) -> str:
    pol = entry["policies"]
    p, b, o = pol[rule][mode], pol[best]["host"], pol["oracle"]["host"]
    over = (p["predictor_us"] + p["planner_us"]) if mode == "host" else p["side_exposed_us"]
    return (f"MoE {p['moe_us']:.1f} us vs best baseline {b['moe_us']:.1f} (+ its LP "
            f"{b['solve_us']:.1f}, stall {b['stall_ms_per_step']:.2f} ms/step) and oracle "
            f"{o['moe_us']:.1f}; PROBE's exposed predictor + planner {over:.1f} us, "
            f"water-filling {p['solve_us']:.1f} us, transfer {p['transfer_us']:.1f} us, "
            f"attention {entry['attention_us']:.0f} us per layer")


ORDER = ["decode", "shift", "repeat", "prefill", "recorded", "recorded-predictor"]


def family(f: dict) -> str:
    """A finding's (or result's) row label: its workload, with the ep when not 8."""
    ep = f.get("ep", 8)
    return f["workload"] if ep == 8 else f"{f['workload']} ep{ep}"


def _family_key(name: str):
    workload, _, ep = name.partition(" ep")
    return (int(ep or 8), ORDER.index(workload) if workload in ORDER else len(ORDER), name)


def _summary(analysis: dict) -> list[str]:
    """Ranges of the headline ratios per workload, side mode (host in the targets section)."""
    rows = ["| workload | cases | best baseline | EPLB+LP (measured LP) | EPLB+LP (LP free) | "
            "PROBE paper | PROBE-on-EPLB linear, fixed split | PROBE-on-EPLB, MoE-time split "
            "once (auto_moe) | PROBE-on-EPLB, fit plans + fallbacks (previous auto) | "
            "PROBE-on-EPLB (auto_plus: + own-split and step-ahead plans) | auto_pred (+ the "
            "pick on the predicted load, charged) | oracle |",
            "|---|---:|---|---|---|---|---|---|---|---|---|---|"]
    families = sorted({family(f) for f in analysis["findings"]}, key=_family_key)
    for w in families:
        per = [v for f in analysis["findings"] if family(f) == w
               for v in f["per_slots"].values()]
        best = sorted({v["best_baseline"] for v in per})

        def rng(values):
            return f"{min(values):.3f}-{max(values):.3f}"

        linear = "-"
        if all("linear_combo" in v for v in per):
            linear = rng([v["ratio"][v["linear_combo"]]["side"] for v in per])
        old = "-"
        if all("probe_on_eplb_auto_moe" in v["ratio"] for v in per):
            old = rng([v["ratio"]["probe_on_eplb_auto_moe"]["side"] for v in per])
        prev = "-"
        if all("probe_on_eplb_auto" in v["ratio"] for v in per):
            prev = rng([v["ratio"]["probe_on_eplb_auto"]["side"] for v in per])
        pred = "-"
        if all("probe_on_eplb_auto_pred" in v["ratio"] for v in per):
            pred = rng([v["ratio"]["probe_on_eplb_auto_pred"]["side"] for v in per])

        rows.append(
            f"| {w} | {len(per)} | {', '.join(best)} | "
            f"{rng([v['ratio']['eplb_lp']['host'] for v in per])} | "
            f"{rng([v['eplb_lp_free_ratio'] for v in per])} | "
            f"{rng([v['ratio']['probe_paper']['side'] for v in per])} | "
            f"{linear} | {old} | {prev} | "
            f"{rng([v['ratio'][v['rule_combo']]['side'] for v in per])} | {pred} | "
            f"{rng([v['ratio']['oracle']['host'] for v in per])} |")
    return rows


def _term_means(results: list[dict], analysis: dict) -> dict[str, list[float]]:
    """workload -> mean us per layer: [oracle saving over the best baseline, PROBE-on-EPLB
    (rule, side) MoE above the oracle, side-stream exposure, water-filling, transfer, net]."""
    acc: dict[str, list] = {}
    for r, f in zip(results, analysis["findings"], strict=True):
        for k, entry in r["slots"].items():
            v = f["per_slots"][int(k)]
            pol = entry["policies"]
            layers = entry["meta"]["model_layers"]
            b = pol[v["best_baseline"]]["host"]
            o = pol["oracle"]["host"]
            p = pol[v["rule_combo"]]["side"]
            base = b["moe_us"] + b["solve_us"] + 1e3 * b["stall_ms_per_step"] / layers
            over = p["side_exposed_us"] + p["solve_us"] + p["transfer_us"]
            acc.setdefault(family(r), []).append(
                (base - o["moe_us"], p["moe_us"] - o["moe_us"], p["side_exposed_us"],
                 p["solve_us"], p["transfer_us"], base - p["moe_us"] - over))
    return {w: [sum(x[i] for x in vals) / len(vals) for i in range(6)]
            for w, vals in acc.items()}


def _verdict(results: list[dict], analysis: dict, sensitivity: dict | None) -> list[str]:
    """Computed sentences: each target's count and the terms that decide it."""
    t = analysis["targets"]
    means = _term_means(results, analysis)
    lines = []
    for mode in ("side", "host"):
        parts = []
        for name, v in t[mode].items():
            status = "n/a" if v["met"] is None else ("met" if v["met"] else "missed")
            parts.append(f"{name.split('_')[0]} {status} ({v['cases'] - len(v['missed'])}/"
                         f"{v['cases']} cases pass)")
        lines.append(f"* {mode} mode: " + "; ".join(parts) + ".")
    for q, tq in analysis.get("targets_of", {}).items():
        parts = [f"{name.split('_')[0]} {v['cases'] - len(v['missed'])}/{v['cases']}"
                 for name, v in tq["side"].items()]
        lines.append(f"* For comparison, {q} (side mode) passes " + ", ".join(parts) + ".")
    side = [(v["policies"]["probe_on_eplb_auto_pred"]["side"]["throughput_tok_s"],
             v["policies"]["probe_on_eplb_auto_plus"]["side"]["throughput_tok_s"])
            for r in results for v in r["slots"].values()
            if "probe_on_eplb_auto_pred" in v["policies"]]
    if side:
        lines.append(f"* probe_on_eplb_auto_pred (side mode) is faster than "
                     f"probe_on_eplb_auto_plus in {sum(a > b for a, b in side)} cases and "
                     f"slower in {sum(a < b for a, b in side)} of {len(side)}.")
    singles = [_single_oracle(entry, f["per_slots"][int(k)])
               for r, f in zip(results, analysis["findings"], strict=True)
               if f["workload"] in ("shift", "repeat") for k, entry in r["slots"].items()]
    singles = [x for x in singles if x is not None]
    if singles:
        gaining = [c for _, c, _ in singles if c is not None]
        lines.append(
            f"* Held to one candidate for the whole run (no per-step choice between "
            f"candidates), the oracle gains at least 0.5 us per layer over the best baseline in "
            f"{len(gaining)} of {len(singles)} shift and repeat cases; PROBE-on-EPLB captures "
            f"at least 80% of that gain (per-layer time) in {sum(c >= 0.8 for c in gaining)} "
            "of them (T2 table below).")
    for w, m in means.items():
        lines.append(
            f"* {w}: the oracle saves {m[0]:.1f} us per MoE layer over the best baseline; "
            f"PROBE-on-EPLB's MoE time sits {m[1]:.1f} us above the oracle's, and it exposes "
            f"{m[2]:.1f} us of predictor + planner (side stream), {m[3]:.1f} us of "
            f"water-filling and {m[4]:.1f} us of transfer: net {m[5]:+.1f} us per layer.")
    for w in sorted({family(f) for f in analysis["findings"]}, key=_family_key):
        pairs = [(v["ratio"][v["rule_combo"]]["side"], v["ratio"][v["linear_combo"]]["side"])
                 for f in analysis["findings"] if family(f) == w
                 for v in f["per_slots"].values() if "linear_combo" in v]
        if w == "decode" and pairs:
            d = [a - b for a, b in pairs]
            lines.append(
                f"* {w}: the history choice with fallbacks (auto) instead of the datasheet "
                f"line at the fixed split moves PROBE-on-EPLB's ratio by "
                f"{min(d):+.3f} to {max(d):+.3f} (mean {sum(d) / len(d):+.3f}); at or above "
                f"1.00x in {sum(a >= 1.0 for a, _ in pairs)} of {len(pairs)} cases (fixed "
                f"split, datasheet line: {sum(b >= 1.0 for _, b in pairs)}).")
    host = [f["per_slots"][k]["ratio"][f["per_slots"][k]["rule_combo"]]["host"]
            for f in analysis["findings"] for k in f["per_slots"]]
    side = [f["per_slots"][k]["ratio"][f["per_slots"][k]["rule_combo"]]["side"]
            for f in analysis["findings"] for k in f["per_slots"]]
    lines.append(f"* Host mode costs PROBE-on-EPLB {100 * (1 - sum(host) / sum(side)):.1f}% "
                 "of throughput on average against the side-stream mode (predictor + the "
                 "lean host planner, 0.77-0.94x the greedy kernel, in series).")
    if sensitivity is not None:
        other = [f["per_slots"][k]["ratio"][f["per_slots"][k]["rule_combo"]]["side"]
                 for f in sensitivity["analysis"]["findings"] for k in f["per_slots"]]
        if len(other) == len(side):
            diff = max(abs(a - b) for a, b in zip(other, side, strict=True))
            lines.append(f"* With {sensitivity['label']}, PROBE-on-EPLB's ratio moves by at "
                         f"most {diff:.3f}: the gap to the oracle comes from the plan itself "
                         "(which replicas the greedy picks and the b/p split; the oracle takes "
                         "the best of several layouts and splits on the truth), not from the "
                         "prediction error.")
    return lines


def _terms(results: list[dict], analysis: dict) -> list[str]:
    """Mean per-layer microseconds: what the oracle saves over the best baseline, and what
    PROBE-on-EPLB (rule, side mode) loses to the oracle, term by term."""
    rows = ["| workload | oracle saves vs best baseline | PROBE MoE above oracle "
            "(misprediction + heuristic) | predictor + planner exposed (side) | "
            "water-filling | replica transfer exposed | PROBE net vs best baseline |",
            "|---|---:|---:|---:|---:|---:|---:|"]
    for w, m in _term_means(results, analysis).items():
        rows.append(f"| {w} | {m[0]:.1f} | {m[1]:.1f} | {m[2]:.1f} | {m[3]:.1f} | {m[4]:.1f} | "
                    f"{m[5]:+.1f} |")
    return rows


def _picks(epochs: list[dict] | None) -> str:
    """Per layer (',' between layers) the candidates an auto policy ran, in order, repeats
    collapsed ('/' between changes)."""
    if not epochs:
        return ""
    out = []
    for layer in range(len(epochs[0]["layers"])):
        seq = []
        for e in epochs:
            if not seq or seq[-1] != e["layers"][layer]:
                seq.append(e["layers"][layer])
        out.append("/".join(seq))
    return ",".join(out)


def _per_layer_us(entry: dict, q: str, mode: str = "side") -> float:
    """Policy q's step time in `mode` per model layer, in microseconds."""
    return 1e3 * entry["policies"][q][mode]["step_ms"] / entry["meta"]["model_layers"]


def _single_oracle(entry: dict, v: dict):
    """(gain us per layer, captured or None, label) of the oracle held to one candidate for
    the whole run (meta["oracle_single"]), None where the run predates it. Its time per layer
    is the oracle's plus its MoE time above the oracle's; captured = (best baseline - auto) /
    (best baseline - it), None where it gains under 0.5 us per layer (the ratio divides by
    noise)."""
    single = entry["meta"].get("oracle_single")
    if not single:
        return None
    it = (_per_layer_us(entry, "oracle", "host") + 1e6 * single["moe_s"]
          - entry["policies"]["oracle"]["host"]["moe_us"])
    best = _per_layer_us(entry, v["best_baseline"], "host")
    gain = best - it
    captured = ((best - _per_layer_us(entry, v["rule_combo"])) / gain if gain >= 0.5
                else None)
    return gain, captured, single["label"]


def _single_oracle_cell(entry: dict, v: dict) -> str:
    """'gain, captured (label)' for the T2 table."""
    got = _single_oracle(entry, v)
    if got is None:
        return "-"
    gain, captured, label = got
    return f"{gain:.1f}, {'-' if captured is None else f'{captured:.2f}'} ({label})"


def _t2_rows(results: list[dict], analysis: dict, sensitivity: dict | None) -> list[str]:
    """The T2 breakdown table (report section 'Where PROBE-on-EPLB loses ...')."""
    rows = ["| model | workload | tok/rank | k | captured | oracle gain | MoE gap | overheads "
            "(side + assign + transfer + stall) | choice | perfect | one-candidate oracle: "
            "gain, captured | auto's picks |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    other = None
    if sensitivity is not None:
        other = {(f["model"], f["workload"], f["batch_per_rank"]): f
                 for f in sensitivity["analysis"]["findings"]}
    for r, f in zip(results, analysis["findings"], strict=True):
        if f["workload"] not in ("shift", "repeat"):
            continue
        for k, entry in sorted(r["slots"].items(), key=lambda x: int(x[0])):
            v = f["per_slots"][int(k)]
            pol = entry["policies"]
            layers = entry["meta"]["model_layers"]
            auto = pol[v["rule_combo"]]["side"]
            gain = (_per_layer_us(entry, v["best_baseline"], "host")
                    - _per_layer_us(entry, "oracle", "host"))
            over = (auto["side_exposed_us"] + auto["solve_us"] + auto["transfer_us"]
                    + 1e3 * auto["stall_ms_per_step"] / layers)
            fixed = [q for q in pol if q.startswith((
                "probe_on_eplb_fit_b", "probe_on_eplb_plan_b", "probe_on_eplb_ahead_b",
                "probe_on_eplb_wf")) or q in ("probe_paper", "eplb_async", "static")]
            choice = (_per_layer_us(entry, v["rule_combo"])
                      - min(_per_layer_us(entry, q) for q in fixed))
            perfect = "-"
            if other is not None and (f["model"], f["workload"], f["batch_per_rank"]) in other:
                o = other[(f["model"], f["workload"], f["batch_per_rank"])]["per_slots"]
                o = o.get(int(k), o.get(str(k)))
                if o is not None:
                    diff = (o["ratio"][o["rule_combo"]]["side"]
                            - v["ratio"][v["rule_combo"]]["side"])
                    perfect = f"{diff:+.3f}"
            picks = _picks(v.get("auto_choices"))
            single = _single_oracle_cell(entry, v)
            rows.append(
                f"| {f['model']} | {f['workload']} | {f['batch_per_rank']} | {k} | "
                f"{v['captured'][v['rule_combo']]['side']:.2f} | {gain:.1f} | "
                f"{auto['moe_us'] - pol['oracle']['host']['moe_us']:.1f} | {over:.1f} | "
                f"{choice:+.1f} | {perfect} | {single} | {picks} |")
    return rows


def _t4_shortfall(result: dict, finding: dict, mode: str) -> str:
    """Why a shift case misses T4: PROBE's closest approach to the oracle's best throughput
    (its fastest policy and slot count in `mode`), that policy's MoE time above the oracle's at
    the same slots, its terms as `_breakdown` gives them plus its re-plan stall, and EPLB +
    LP's closest approach."""
    slots = result["slots"]
    oracle_k = max(slots, key=lambda k: slots[k]["policies"]["oracle"]["host"]["throughput_tok_s"])
    best = slots[oracle_k]["policies"]["oracle"]["host"]["throughput_tok_s"]
    probe = [(entry["policies"][q][mode]["throughput_tok_s"], k, q)
             for k, entry in slots.items() for q in entry["policies"]
             if q.startswith(("probe_paper", "probe_on_eplb"))]
    thr, k, q = max(probe)
    entry = slots[k]
    pol = entry["policies"][q][mode]
    stall = 1e3 * pol["stall_ms_per_step"] / entry["meta"]["model_layers"]
    moe_gap = pol["moe_us"] - entry["policies"]["oracle"]["host"]["moe_us"]
    lp = max((entry["policies"]["eplb_lp"]["host"]["throughput_tok_s"], kk)
             for kk, entry in slots.items())
    baseline = finding["per_slots"][int(k)]["best_baseline"]
    return (f"Closest PROBE: {q} at {k} slots, {100 * (1 - thr / best):.1f}% below the oracle's "
            f"best throughput (at {oracle_k} slots; within 2% needed): at {k} slots its MoE time "
            f"sits {moe_gap:.1f} us per layer above the oracle's (the plan against the oracle's "
            f"plans on the true load, free); {_breakdown(entry, q, baseline, mode)}, re-plan "
            f"stall {stall:.1f} us. Closest EPLB + LP: {100 * (1 - lp[0] / best):.1f}% below, "
            f"at {lp[1]} slots.")


def _revision(git: dict) -> str:
    """The manifest's git revision, marked -dirty when tracked files differed from it."""
    return f"{git.get('revision')}{'-dirty' if git.get('dirty') else ''}"


def _scoring_interval(results: list[dict], settings: dict) -> str:
    """One sentence: the auto policies' score_every (--score-every) and, with 'auto', the
    interval chosen per case for auto_plus and auto."""
    every = settings.get("score_every", 1)
    text = ("every measured step (--score-every 1): every candidate planned and scored on "
            "each step's true load, in the background of the next step" if every == 1 else
            f"every {every} measured steps (--score-every {every})" if every != "auto" else
            "--score-every auto: per run the smallest interval k at which one scoring's "
            "background work, 1/k of it against each step's non-communication time, is "
            "exposed at no step")
    if every == 1:
        return text + "."
    text += ("; picks change only when a scoring is done (k steps after its step) and are "
             "made from the scored steps alone; the work per scoring is unchanged "
             "(probe.sim.fair)")
    if settings.get("rescore", False):
        triggered = sum(len(entry["meta"].get("auto_scoring", {}).get(
            "probe_on_eplb_auto_plus", {}).get("triggered_steps", []))
            for r in results for entry in r["slots"].values())
        text += ("; with --rescore (the default) auto and auto_plus also score at once, in "
                 "the background of the step after, when a step's traffic changed since the "
                 "latest scored step before it (the mean per-layer total-variation distance "
                 "of its expert loads, or the served candidates' measured MoE time, beyond "
                 "the largest step-to-step change within k steps in the history window, the "
                 "time at least 1%) and what a re-pick can win back (the served layers' MoE "
                 "time growth, at most their compute excess's growth: largest rank over the "
                 "mean rank) over the steps it saves exceeds its extra exposure if run whole at "
                 "that step: that scoring is then spread over the fewest steps that maximise "
                 "that saving minus its exposure (one where it fits the step, more where "
                 "that hides it; probe.sim.fair.trigger_length) and charged there, the "
                 "running one is dropped and the every-k schedule restarts after it, and the "
                 "picks use the scorings from it on (auto_replan scores only every k steps); "
                 f"auto_plus triggered {triggered} such scorings over all cases")
        if settings.get("shift_response", False):
            text += ("; with --shift-response (the default), from the step a triggered "
                     "scoring starts until its pick, a layer EPLB's even split or static "
                     "serves takes the adaptive candidate (per-step slots) fastest on the "
                     "latest scored steps wherever that was faster there than the fallback "
                     "is at the changed step")
        if settings.get("guard", False):
            text += ("; with --guard (the default), before each layer's dispatch the "
                     "candidate without per-step slots that an auto_plus layer serves is "
                     "scored on the step's prediction where that fitted the dispatch at the "
                     "step before, and at 25% (GUARD_GROWTH) above its predicted time at the "
                     "latest step it served calmly the layer takes that adaptive candidate "
                     "for the step where it was faster on the latest scored steps (the "
                     "predictor and one scoring charged on the side stream, or in series in "
                     "host mode)")
    text += ("; the picker scores each candidate with the background exposure the charge "
             "gives it (a step-ahead split's own plan and a fallback's background prediction "
             "share the step's spare time with the scoring), averaged over every step since "
             "the first scored step it uses, at the every-k scoring's share (a triggered "
             "scoring's is paid once); the first pick adds that of the first measured step")
    if every != "auto":
        return text + "."
    chosen = []
    for r in results:
        for k, entry in r["slots"].items():
            sc = entry["meta"].get("auto_scoring", {})
            chosen.append(f"{r['model']} {r['workload']} k={k}: "
                          f"{sc.get('probe_on_eplb_auto_plus', {}).get('score_every')}/"
                          f"{sc.get('probe_on_eplb_auto', {}).get('score_every')}")
    return text + ". Chosen interval (auto_plus/auto) per case and slots: " + \
        "; ".join(chosen) + "."


def _what_if_charges(settings: dict) -> str:
    """'planner charged ..., assignment charged ...' of --planner-us / --assign-us ('')."""
    parts = []
    for key, what in (("planner_us", "planner"), ("assign_us", "assignment")):
        named = settings.get(key)
        if named:
            parts.append(f"{what} charged " + ", ".join(
                f"{us:g} us at ep = {ep}" for ep, us in sorted(
                    (int(ep), float(us)) for ep, us in named.items())))
    return "; ".join(parts)


def _planner_what_if(settings: dict) -> list[str]:
    """The report's warning line when --planner-us / --assign-us replaced measured charges."""
    text = _what_if_charges(settings)
    if not text:
        return []
    return ["", f"**What-if, not measured:** in side mode the {text} per layer (--planner-us, "
            "--assign-us) instead of the measured charges (the faster of the host path plus a "
            "round trip and the measured GPU kernel). The host mode's charges are unchanged, "
            "but the auto policies pick on side-mode times, so their picks follow the what-if "
            "and this run's host-mode figures are not those of a host-mode system."]


def write_report(results: list[dict], analysis: dict, manifest: dict, path: Path,
                 sensitivity: dict | None = None) -> None:
    """report.md; sensitivity: {"label", "folder", "analysis"} of a second run (e.g. with a
    perfect predictor) whose summary is added for comparison."""
    by_key = {(r["model"], r["workload"], r["batch_per_rank"]): r for r in results}
    s = manifest["settings"]
    mn = s.get("multinode")
    multinode = ("none in this run" if not mn else
                 f"DeepSeek-V3 (256 experts, top-8, 58 MoE layers) at ep = "
                 f"{' and '.join(str(e) for e in mn['eps'])} (nodes of 8 H200s, RDMA between "
                 f"them) on decode, shift and repeat at {mn['batch']} tokens per rank, "
                 f"{mn['layers']} MoE layers per trace, {mn['prior']} history steps then "
                 f"{mn['steps']} measured steps (fewer steps, layers and slots than at "
                 f"ep = 8: at ep = 64 one case takes minutes on 2 cores), slots "
                 f"{mn['slots']}; EPLB window = interval = "
                 f"{mn['prior']} steps; costed from qwen3-235b-a22b's measurements "
                 "(probe/sim/costs.py: expert table scaled by DeepSeek-V3's expert bytes and "
                 "FLOPs, qwen3's attention and predictor; no DeepSeek-V3 table was measured)")
    predictor_info = [r.get("predictor") for r in results if r.get("predictor")]
    replayed = ("" if not predictor_info else
                " Measured top-k accuracy of that predictor on the samples, layers 1-7: "
                + ", ".join(f"{v:.2f}" for v in predictor_info[0]["topk_accuracy"].values())
                + f" (mean {predictor_info[0]['mean_topk_accuracy']:.2f}, "
                f"{predictor_info[0]['samples']} sampled tokens).")
    lines = [
        "# Fair comparison: EPLB, EPLB + LP, PROBE and an oracle at equal extra slots",
        "",
        f"Command: `{manifest['command']}` (PYTHONPATH = the repository root), revision "
        f"{_revision(manifest['git'])}, {manifest['started_utc']}, {manifest['machine']['cpus']} "
        f"CPUs ({manifest['machine']['platform']}), {manifest['elapsed_s']} s. Everything here "
        "is a simulation on calibrated H200 costs, not a measurement on GPUs. Full tables: "
        "tables.md (and tables.json.gz); plot: fair_memory.png; manifest.json.",
        *_planner_what_if(s),
        "",
        "## Verdict (computed from the tables below)",
        "",
        *_verdict(results, analysis, sensitivity),
        "",
        "## Summary (throughput / best baseline, min-max over models, batch sizes and 1-4 slots; "
        "PROBE in the side-stream mode; prefill: chunk-latency speed-up)",
        "",
        *_summary(analysis),
        "",
        "## Setup",
        "",
        f"* Traces: probe.traces.generate (decode, shift, repeat at 256/768/1536 tokens per "
        f"rank; chunked prefill at 8K/16K tokens per rank), ep = 8, {s['layers']} MoE "
        f"layers per trace standing for all of the model's layers, {s['prior']} history steps "
        f"then {s['steps']} measured decode steps ({s.get('prefill_steps')} prefill steps); "
        "the shift happens a third into the measured steps. 'recorded': "
        f"{', '.join(s.get('recorded') or []) or 'none in this run'} (real routing of the "
        "small model, its experts costed with gpt-oss-120b's numbers, "
        f"{s.get('recorded_steps')} measured steps centred on its shift). Predictions "
        f"from the error model `{s['predictor']}` (probe/sim/predict.py) for every trace, "
        "'recorded' included. 'recorded-predictor': the same recorded trace with the small "
        "model's own lookahead predictor (the frozen next-layer router, probe.predictor: "
        "router l applied to layer l-1's router input), replayed through its confusion "
        "measured on the recorded router samples (hidden states exist for 1.5% of the tokens "
        "only, so each true count is drawn through the per-layer confusion; layer 0, which has "
        "no previous layer, uses the previous step's load; experiments.fair.run."
        f"recorded_predictor).{replayed}",
        f"* Across nodes: {multinode}.",
        f"* Scoring interval of the auto policies: {_scoring_interval(results, s)}",
        f"* Slots: {s['slots']} extra expert slots per rank for every policy. EPLB's are "
        "resident in every layer (k x layers x expert bytes per rank); PROBE's per-step slots "
        "are double-buffered for the layers in flight (2 x p x expert bytes). PROBE-on-EPLB "
        "splits k = b resident + p per-step. The PROBE-on-EPLB of the targets "
        "(probe_on_eplb_auto_plus) picks per layer, from the history "
        "window, the candidate with the lowest side-mode layer time with every overhead it pays "
        "(predictor + planner beyond the dispatch, the assignment, exposed transfer, "
        "stall): the split b = 0, p = k of the planner with alpha, beta refitted to the "
        "measured expert table, water-filled at dispatch (fit), the same plan with its own "
        "token split (plan: no assignment in series) and the plan made one step ahead on the "
        "step before's load (ahead: no predictor, the model's L layers planned during the rest "
        "of that step, what exceeds it charged, its own split), the plan and ahead splits "
        "b = k, p = 0 (EPLB-k's layout, no per-step replica, the greedy's token split in "
        "place of the even split), the paper's PROBE, and the "
        "fallbacks EPLB's even split (eplb_async's layout and split), EPLB water-filled on the "
        "true load (probe_on_eplb_wf, assignment charged) and static EP. "
        + ("Nested layouts (--nested): every EPLB-b, b < k, is EPLB-k's layout with k - b "
           "redundant copies per rank dropped (the copy leaving its expert the lowest load "
           "per copy; probe.sim.fair.nested_copies), a subset of EPLB-k, so the picker also "
           "takes the plan and ahead splits b = 1 .. k - 1, p = k - b (per-step replicas in "
           "the freed slots) at EPLB-k's memory"
           + (" (b = 0 too)" if s.get("switch_charges") else "")
           + ("; the standalone probe_on_eplb b/p policies use the same nested layouts. "
              if s.get("switch_charges") else
              "; a layer switched back to more resident copies fetches the dropped ones "
              "again behind that layer's window, what exceeds it charged as exposed "
              "transfer; the standalone probe_on_eplb b/p policies use "
              "the same nested layouts. ")
           if s.get("nested") else
           "Only b = 0 and b = k: DeepSeek's EPLB-b of 0 < b < k holds other copies than "
           "EPLB-k's. " if s.get("switch_charges") else
           "Only b = 0 and b = k: it keeps every candidate's layout resident, and EPLB-k "
           "with any EPLB-b, 0 < b < k, would exceed the k slots per rank (equal memory). ")
        + ("A rank holds, per layer, only the layout of the candidate serving it (the "
           "sharded home of static and the paper's PROBE, EPLB-0 or a nested EPLB-b, "
           "EPLB-k); a layer switched to a layout holding copies the serving one's does not "
           "fetches them behind that layer's window, what exceeds it charged as exposed "
           "transfer and counted as moved bytes, and every pick weighs that exposure "
           "before it switches (probe.sim.fair.switch_charges, switch_exposure). "
           if s.get("switch_charges") else
           "Switching a layer between the sharded home, EPLB-0 and EPLB-k is free in this "
           "run (a rank serving all three in different steps holds all three: not at equal "
           "memory; charged since a later revision). ")
        + "Its memory is EPLB-k's plus the "
        "double-buffered p = k per-step slots, its stall the largest of all candidates' at "
        "every step. On top of the candidate that serves it pays its own work: in the "
        "background against the step's non-communication time (L layers), the plans and the "
        "scoring of every candidate on the true load that its picks need (one water-filling "
        "kernel time per candidate) and, for the layers whose serving candidate does not "
        "consume the prediction (a fallback or the ahead split), the predictor's measured time "
        "(the prediction is then needed only for the scoring's plans; layer l's needs only "
        "layer l-1's router input of the step); where a fit, plan or paper candidate serves, "
        "the predictor is charged as that candidate's (beyond the dispatch; host mode in "
        "series). The first pick from the window "
        "before the measured steps, re-picked at each EPLB re-plan from the steps before it, "
        "and between re-plans switching a layer when another candidate was at least 1% faster "
        "over the last window // 4 steps; a layer leaves the faster of EPLB's even split and "
        "static only for a candidate 1% faster, and returns to it from any other candidate as "
        "soon as it is no slower (cells: layer choices, '/' between re-picks; "
        "auto_replan: the re-plan picks alone). 'auto_pred' overrides auto_plus's pick per step "
        "and layer with the candidate best on the step's predicted load (1% margin), paying the "
        "predictor, its plans and the scoring of every candidate each step (probe.sim.fair). "
        "'auto' is the same picker without the plan and "
        "ahead candidates (the previous target); 'auto_moe' the earlier rule (the "
        "split with the lowest MoE time, fit splits only, fixed for the run); 'linear, fixed "
        "split' the one before: the datasheet alpha + beta n line at p = max(1, k // 2). "
        "tables.md lists every "
        "split of both planners; the best split per case (picked after the run) is shown "
        "separately and not used for the targets.",
        f"* EPLB scaling: vLLM uses a 1000-step window and a 3000-step interval, SGLang "
        f"re-plans every 1000 iterations; the traces are far shorter, so window = interval = "
        f"{s['eplb_window']} steps (factor {s['eplb_window'] / 1000:.3f} of SGLang's), the first "
        "layout planned on the window before the measured steps (steady state). Warm-up (no "
        "layout yet) is static's row.",
        "* Throughput = measured tokens / (model layers x mean layer time + stop-the-world "
        "stalls); dense layers, embedding and LM head are not modelled, so ratios are of the "
        "attention + MoE part of a step.",
        "* Not modelled: replica and re-plan transfers contending with dispatch/combine traffic "
        "on NVLink; attention to earlier chunks' KV in prefill; in the host mode the host "
        "round trip of the dispatch-time water-filling (its Numba kernel time is charged). The "
        "side mode charges, per layer, the faster real way to plan or assign ONE layer: the "
        "host path plus a 16 us host round trip (measured on an H100, the host doing "
        "nothing else), or the GPU kernel's one-layer latency (measured for the assignment: "
        "350-570 us at ep = 8; estimated for the greedy as its whole 32-layer launch); the "
        "GPU kernels' per-layer times in a multi-layer launch (16-37 us, 23 us at ep = 8) "
        "are throughput, not the latency a runtime that plans layer by layer would see, and "
        "are not charged (constants below).",
        "* The oracle is the best of every policy's plan and of greedy plans on the true load "
        "(a heuristic upper reference, zero cost), not a proven optimum.",
        "",
        "Policies and charging, from probe/sim/fair.py:",
        "",
        "```",
        FAIR_DOC.strip(),
        "```",
        "",
        "## Constants (probe/sim/costs.py)",
        "",
        "| name | value | unit | source |",
        "|---|---|---|---|",
    ]
    for row in results[0]["constants"]:
        value = row["value"]
        value = f"{value:.4g}" if isinstance(value, float) else value
        lines.append(f"| {row['name']} | {value} | {row['unit']} | {row['source']} |")
    lines += ["", "## Headline: throughput / best baseline (side-stream mode for PROBE; host "
              "mode in parentheses)", "",
              "| model | workload | tok/rank | k | best baseline | EPLB+LP | EPLB+LP, LP free | "
              "PROBE paper | PROBE-on-EPLB linear, fixed split | PROBE-on-EPLB auto (its "
              "choice per layer) | PROBE-on-EPLB (best split, post hoc) | "
              "oracle | captured (auto, side) |",
              "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for f in analysis["findings"]:
        for k, v in sorted(f["per_slots"].items()):
            r = v["ratio"]
            rule = v["rule_combo"]
            combo = v["best_combo_post_hoc"]
            cap = v["captured"][rule]["side"]
            lin = v.get("linear_combo")
            lin_cell = "-" if lin is None else f"{r[lin]['side']:.3f} ({r[lin]['host']:.3f})"
            split_cell = " " + _picks(v.get("auto_choices"))
            lines.append(
                f"| {f['model']} | {f['workload']} | {f['batch_per_rank']} | {k} | "
                f"{v['best_baseline']} | {r['eplb_lp']['host']:.3f} | "
                f"{v['eplb_lp_free_ratio']:.3f} | "
                f"{r['probe_paper']['side']:.3f} ({r['probe_paper']['host']:.3f}) | "
                f"{lin_cell} | "
                f"{r[rule]['side']:.3f} ({r[rule]['host']:.3f}){split_cell} | "
                f"{r[combo]['side']:.3f} ({combo.removeprefix('probe_on_eplb_')}) | "
                f"{r['oracle']['host']:.3f} | {cap:.2f} |")
    lines += ["", "Fewest extra slots within 2% of the oracle's best throughput (slots, GB per "
              "rank; '-' = not reached at 4):", "",
              "| model | workload | tok/rank | eplb_async | eplb_lp | probe_paper (side) | "
              "best probe_on_eplb split (side) |", "|---|---|---:|---|---|---|---|"]
    for f in analysis["findings"]:
        w = f["within_2pct"]

        def cell(key, w=w):
            hit = w.get(key)
            return "-" if not hit else f"{hit[0]} ({hit[1]:.2f} GB)"

        combos = [(key, hit) for key, hit in w.items()
                  if key.startswith("probe_on_eplb") and key.endswith("/side") and hit]
        combo = min(combos, key=lambda x: x[1][1]) if combos else None
        combo_cell = "-" if combo is None else \
            f"{combo[0].split('/')[0]}: {combo[1][0]} ({combo[1][1]:.2f} GB)"
        lines.append(f"| {f['model']} | {f['workload']} | {f['batch_per_rank']} | "
                     f"{cell('eplb_async/host')} | {cell('eplb_lp/host')} | "
                     f"{cell('probe_paper/side')} | {combo_cell} |")
    if sensitivity is not None:
        lines += ["", f"### Sensitivity: {sensitivity['label']} ({sensitivity['folder']})", "",
                  *_summary(sensitivity["analysis"])]
    lines += ["", "## Where the time goes (mean us per MoE layer over models, batches and "
              "slots)", "", *_terms(results, analysis), "",
              "The oracle's saving is the most any balancer can gain over the best baseline; "
              "PROBE-on-EPLB keeps it minus the next four columns (net: the last).", ""]
    lines += ["## Where PROBE-on-EPLB loses against the oracle on shift and repeat (T2)", "",
              "Per case, microseconds per layer of the side-mode step time (model layers x "
              "layer time + stalls, divided by the model's layers); 'auto' is the target policy "
              "(probe_on_eplb_auto_plus). 'oracle gain': best "
              "baseline minus oracle; 'MoE gap': auto's MoE time above the oracle's "
              "(the plan: which candidate each layer runs, which replicas, the b/p split, and "
              "the prediction); 'overheads': auto's exposed predictor + planner, assignment, "
              "replica transfer and stall; 'choice': auto minus the best single candidate of "
              "the case fixed for the whole run (post hoc: what picking from history cost); "
              "'perfect': auto's ratio with the perfect predictor minus its ratio here (what "
              "the prediction error cost), where a perfect-predictor run is given; "
              "'one-candidate oracle': the oracle held to the one candidate (a policy's plan "
              "or a plan on the true load, free) with the lowest MoE time over the whole run, "
              "its gain over the best baseline and the share of it auto captures: what is "
              "left without the oracle's per-step choice between candidates.", "",
              *_t2_rows(results, analysis, sensitivity), ""]
    lines += ["", "## Targets", ""]
    for mode in ("side", "host"):
        lines += [f"### PROBE overheads in the {mode} mode", ""]
        for name, t in analysis["targets"][mode].items():
            met = {True: "**met**", False: "**missed**", None: "not applicable"}[t["met"]]
            lines.append(f"* {TARGET_TEXT[name]}: {met} ({t['cases']} cases, "
                         f"{len(t['missed'])} missed).")
            for tag, k, value, _ in t["missed"][:8]:
                model, workload, batch = tag.split(" ")
                r = by_key[(model, workload, int(batch[2:]))]
                f = next(x for x in analysis["findings"]
                         if (x["model"], x["workload"], x["batch_per_rank"])
                         == (model, workload, int(batch[2:])))
                if name.startswith("T4"):
                    def gb(x):
                        return "not within 2% at <= 4 slots" if x is None else f"{x:.2f} GB"

                    lines.append(f"  - {tag}: PROBE (best of its policies) "
                                 f"{gb(value['probe_gb'])}, EPLB + LP {gb(value['eplb_lp_gb'])} "
                                 "per rank. " + _t4_shortfall(r, f, mode))
                    continue
                entry = r["slots"][k] if k in r["slots"] else r["slots"][str(k)]
                v = f["per_slots"][int(k)]
                lines.append(f"  - {tag}, k={k}: {value:.3f}; "
                             + _breakdown(entry, v["rule_combo"], v["best_baseline"], mode))
            if len(t["missed"]) > 8:
                lines.append(f"  - ... {len(t['missed']) - 8} more in tables.json.gz.")
        lines.append("")
    path.write_text("\n".join(lines) + "\n")


TABLES = "tables.json.gz"  # gzip-compressed JSON: each run's tables are several MB as text


def load_tables(folder: Path) -> dict:
    """A run's {"results", "analysis"}: its tables.json.gz, or tables.json (runs written before
    the tables were compressed)."""
    import gzip
    import json

    path = folder / TABLES
    if path.exists():
        return json.loads(gzip.decompress(path.read_bytes()))
    if (folder / "tables.json").exists():
        return json.loads((folder / "tables.json").read_text())
    raise FileNotFoundError(f"{folder}: neither {TABLES} nor tables.json (not a folder written "
                            "by experiments.fair.run?)")


def main(argv=None) -> int:
    """Re-render report.md and fair_memory.png from a run's tables.json.gz and manifest.json."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m experiments.fair.report")
    ap.add_argument("folder", type=Path, help="a folder written by experiments.fair.run")
    ap.add_argument("--sensitivity", type=Path, default=None,
                    help="another run's folder whose summary is added")
    args = ap.parse_args(argv)
    tables = load_tables(args.folder)
    for r in tables["results"]:  # JSON object keys come back as strings
        r["slots"] = {int(k): v for k, v in r["slots"].items()}
    for f in tables["analysis"]["findings"]:
        f["per_slots"] = {int(k): v for k, v in f["per_slots"].items()}
    manifest = json.loads((args.folder / "manifest.json").read_text())
    write_report(tables["results"], tables["analysis"], manifest, args.folder / "report.md",
                 load_sensitivity(args.sensitivity))
    from experiments.fair.run import plot_memory

    plot_memory(tables["results"], args.folder / "fair_memory.png")
    return 0


def load_sensitivity(folder: Path | None) -> dict | None:
    """{"label", "folder", "analysis"} of the run in `folder` (None: None)."""
    if folder is None:
        return None
    import json

    tables = load_tables(folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    settings = manifest["settings"]
    what_if = _what_if_charges(settings)
    what_if = f", {what_if}" if what_if else ""
    return {"label": f"predictor {settings['predictor']}, --score-every "
                     f"{settings.get('score_every', 1)}{what_if}", "folder": str(folder),
            "analysis": tables["analysis"]}


if __name__ == "__main__":
    raise SystemExit(main())
