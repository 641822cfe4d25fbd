"""Privacy sanitizer evaluation: leak rate per entity type, over-redaction, round trip, ms per KB.

Usage::

    .venv/bin/python bench/privacy_eval.py [--data ../shared/data/pii/dev.jsonl] [--no-anchor] [--show-leaks N]

Input: JSON lines ``{"text", "spans": [{"type", "value", "start", "end"}]}``.

* leak rate (per labelled type): share of labelled values still present verbatim in the
  sanitized text (what would leave the node);
* over-redaction: share of characters outside every labelled span that were replaced;
* exact round trip: share of texts with ``restore(sanitize(text)) == text``;
* ms per KB: sanitize time per KiB of UTF-8 input, one call per text (after a warm-up), the best
  of ``--repeats`` passes, as wall time and as process CPU time (on a shared machine the CPU figure
  is the one other processes disturb least).

Generalisation checks (the issue's evaluation also uses held-out templates of the same generator):

* ``--holdout 0.3 --seed S``: leak rates on a random 30% of the templates next to the rest;
* ``--resample S``: every labelled value replaced by a fresh Faker value of its type from one of
  19 locales (same templates, new names, addresses, phone formats, IBAN countries);
* ``--own-templates N --seed S``: N texts from templates written for this check (not taken from
  the dev set), filled with Faker values, 15% of them lower-cased as the generator does.

Anchor, side by side: presidio's stock ``AnalyzerEngine`` with all predefined recognizers on the
same offline no-op NLP engine (no spaCy model can be installed), replacing its detections with
the same placeholders. Ratios are ours / anchor.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from potluck.privacy.analyzer import Detector  # noqa: E402
from potluck.privacy.entities import Span, resolve_overlaps  # noqa: E402
from potluck.privacy.sanitizer import Sanitizer  # noqa: E402

GOALS = {  # leak-rate goals from the issue
    "EMAIL_ADDRESS": 0.0,
    "PHONE_NUMBER": 0.0,
    "CREDIT_CARD": 0.0,
    "IBAN_CODE": 0.0,
    "US_SSN": 0.0,
    "IP_ADDRESS": 0.0,
    "SECRET": 0.0,
    "PERSON": 0.05,
    "STREET_ADDRESS": 0.05,
    "ORGANIZATION": 0.05,
}


class AnchorDetector(Detector):
    """presidio out of the box (all predefined recognizers, no NLP model)."""

    def __init__(self) -> None:
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
        from presidio_analyzer.nlp_engine import NoOpNlpEngine

        nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "none"}])
        nlp.load()
        reg = RecognizerRegistry()
        reg.load_predefined_recognizers(nlp_engine=nlp)
        reg.remove_recognizer("SpacyRecognizer")
        reg.remove_recognizer("EmailRecognizer")  # its tldextract fetches the suffix list online
        from potluck.privacy.recognizers import OfflineEmailRecognizer

        reg.add_recognizer(OfflineEmailRecognizer())
        self.engine = AnalyzerEngine(registry=reg, nlp_engine=nlp, supported_languages=["en"])
        self.min_score = 0.0

    def detect(self, text: str) -> list[Span]:
        res = self.engine.analyze(text=text, language="en", score_threshold=0.0)
        return resolve_overlaps(Span(r.start, r.end, r.entity_type, r.score) for r in res)


def evaluate(sanitizer: Sanitizer, rows: list[dict], show_leaks: int = 0, repeats: int = 3) -> dict:
    for row in rows[:20]:  # warm-up
        sanitizer.sanitize([row["text"]])
    leaks: Counter[str] = Counter()
    totals: Counter[str] = Counter()
    leaked_examples: dict[str, list[str]] = defaultdict(list)
    unlabelled = over = roundtrip = 0
    n_bytes = 0
    elapsed = 0.0
    for row in rows:
        text = row["text"]
        n_bytes += len(text.encode())
        t0 = time.perf_counter()
        result = sanitizer.sanitize([text])
        elapsed += time.perf_counter() - t0
        sanitized = result.texts[0]
        roundtrip += result.restorer().restore(sanitized) == text
        labelled = [False] * len(text)
        for s in row["spans"]:
            for i in range(s["start"], s["end"]):
                labelled[i] = True
        replaced = [False] * len(text)
        for r in result.replacements[0]:
            for i in range(r.start, r.end):
                replaced[i] = True
        for i, c in enumerate(text):
            if not labelled[i] and not c.isspace():
                unlabelled += 1
                over += replaced[i]
        for s in row["spans"]:
            totals[s["type"]] += 1
            if s["value"].strip() and s["value"] in sanitized:
                leaks[s["type"]] += 1
                if len(leaked_examples[s["type"]]) < show_leaks:
                    leaked_examples[s["type"]].append(f"{s['value']!r} in {sanitized!r}")
    cpu_best, wall_best = float("inf"), elapsed
    for _ in range(repeats):  # timing-only passes; the minimum is the least disturbed by other load
        c0, w0 = time.process_time(), time.perf_counter()
        for row in rows:
            sanitizer.sanitize([row["text"]])
        cpu_best = min(cpu_best, time.process_time() - c0)
        wall_best = min(wall_best, time.perf_counter() - w0)
    kib = n_bytes / 1024
    return {
        "ms_per_kb_wall": wall_best * 1000 / kib,
        "ms_per_kb_cpu": cpu_best * 1000 / kib if repeats else float("nan"),
        "leak": {t: leaks[t] / n for t, n in totals.items()},
        "totals": dict(totals),
        "over_redaction": over / max(unlabelled, 1),
        "round_trip": roundtrip / len(rows),
        "examples": dict(leaked_examples),
    }


# --- generalisation data ------------------------------------------------------------------------------

LOCALES = (
    "en_US",
    "en_GB",
    "de_DE",
    "fr_FR",
    "fi_FI",
    "hu_HU",
    "pl_PL",
    "sv_SE",
    "da_DK",
    "it_IT",
    "es_ES",
    "pt_BR",
    "cs_CZ",
    "nl_NL",
    "no_NO",
    "de_CH",
    "en_AU",
    "en_CA",
    "pt_PT",
)

OWN_TEMPLATES = r"""Hey, it's {FIRST}. Can you call me back at {PHONE}?
Please ship the order to {ADDRESS}
Our new intern, {PERSON}, starts on Monday in the {ORG} office.
Transfer the deposit to IBAN {IBAN} before Friday.
I forgot the PIN for card {CARD}; can you reset it?
The server at {IP} keeps rejecting my login.
{PERSON} <{EMAIL}> wrote: see you tomorrow
Reach our support desk on {PHONE} or at {EMAIL}.
My social security number is {SSN} and my date of birth is in the file.
Dear {PERSON},\nthank you for your application to {ORG}.\nKind regards,\n{PERSON2}
Can {FIRST} pick up the keys from {STREET} after six?
{ORG} has appointed {PERSON} as chief financial officer.
Invoice recipient:\n{PERSON}\n{ADDRESS}
Attn: {PERSON}, {ORG}, {STREET}
We met {PERSON} and {PERSON2} at the conference in {CITY}.
Is {STREET} close to the train station?
Send the contract to {EMAIL} and cc {EMAIL2}.
Please wire the refund to {IBAN} (account holder: {PERSON}).
{FIRST} {LAST} was born in {CITY} and moved to {COUNTRY} as a child.
the package for {PERSON} was left at {STREET}
card number {CARD} expired last month, please send a new one to {ADDRESS}
Mr. {LAST} asked us to update his phone number to {PHONE}.
Ms. {LAST} from {ORG} called twice today.
{PERSON} ({EMAIL}) has been added to the project.
New address for {FIRST}: {STREET}, {CITY}
According to {PERSON}, {ORG} will open a branch in {CITY}.
Contact person: {PERSON}, tel. {PHONE}
shipping label:\n{PERSON}\n{ADDRESS}\nphone {PHONE}
The VPN gateway moved from {IP} to {IP2}.
Is this {PERSON}'s desk?
Thanks, {FIRST}! I'll forward it to {PERSON2} at {ORG}.
Our headquarters are at {ADDRESS}
I bank with {ORG}; my IBAN is {IBAN}.
Please remove {PERSON} from the mailing list ({EMAIL}).""".split("\n")


def _faker_values(seed: int):  # -> Callable[[str], tuple[str, str] | None]
    """A function from a type (or template slot) to (entity type, fresh value), seeded."""
    import random

    from faker import Faker

    rnd = random.Random(seed)
    fakers = {loc: Faker(loc) for loc in LOCALES}
    for f in fakers.values():
        f.seed_instance(rnd.randrange(1 << 30))

    def value(kind: str) -> tuple[str, str] | None:
        f = fakers[rnd.choice(LOCALES)]
        k = kind.rstrip("0123456789")
        table = {
            "PERSON": ("PERSON", lambda: f.name() if rnd.random() < 0.7 else rnd.choice([f.first_name, f.last_name])()),
            "FIRST": ("PERSON", f.first_name),
            "LAST": ("PERSON", f.last_name),
            "STREET_ADDRESS": ("STREET_ADDRESS", lambda: f.address() if rnd.random() < 0.5 else f.street_address()),
            "ADDRESS": ("STREET_ADDRESS", f.address),
            "STREET": ("STREET_ADDRESS", f.street_address),
            "ORGANIZATION": ("ORGANIZATION", f.company),
            "ORG": ("ORGANIZATION", f.company),
            "PHONE_NUMBER": ("PHONE_NUMBER", f.phone_number),
            "PHONE": ("PHONE_NUMBER", f.phone_number),
            "EMAIL_ADDRESS": ("EMAIL_ADDRESS", f.email),
            "EMAIL": ("EMAIL_ADDRESS", f.email),
            "CREDIT_CARD": ("CREDIT_CARD", f.credit_card_number),
            "CARD": ("CREDIT_CARD", f.credit_card_number),
            "IBAN_CODE": ("IBAN_CODE", f.iban),
            "IBAN": ("IBAN_CODE", f.iban),
            "US_SSN": ("US_SSN", fakers["en_US"].ssn),
            "SSN": ("US_SSN", fakers["en_US"].ssn),
            "IP_ADDRESS": ("IP_ADDRESS", f.ipv4),
            "IP": ("IP_ADDRESS", f.ipv4),
            "CITY": ("GPE", f.city),
            "COUNTRY": ("GPE", f.country),
        }
        if k not in table:
            return None
        etype, make = table[k]
        return etype, make()

    return value, rnd


def resample_values(rows: list[dict], seed: int) -> list[dict]:
    """``rows`` with every labelled value of a goal type replaced by a fresh Faker value (same casing
    style: a lower-case value stays lower case); rows with overlapping labels are dropped."""
    value, _ = _faker_values(seed)
    out = []
    for row in rows:
        spans = sorted(row["spans"], key=lambda s: s["start"])
        if any(a["end"] > b["start"] for a, b in itertools.pairwise(spans)):
            continue
        text, pos, parts, new = row["text"], 0, [], []
        for s in spans:
            fresh = value(s["type"]) if s["type"] in GOALS else None
            v = fresh[1] if fresh else s["value"]
            if s["value"].islower() and s["type"] != "EMAIL_ADDRESS":
                v = v.lower()
            parts.append(text[pos : s["start"]])
            start = sum(map(len, parts))
            parts.append(v)
            new.append({"type": s["type"], "value": v, "start": start, "end": start + len(v)})
            pos = s["end"]
        parts.append(text[pos:])
        out.append({"text": "".join(parts), "spans": new, "template_id": row.get("template_id")})
    return out


def own_template_rows(n: int, seed: int) -> list[dict]:
    """``n`` labelled texts from :data:`OWN_TEMPLATES` filled with Faker values."""
    import re

    value, rnd = _faker_values(seed)
    rows = []
    for i in range(n):
        template = OWN_TEMPLATES[i % len(OWN_TEMPLATES)].replace("\\n", "\n")
        lower = rnd.random() < 0.15
        text, spans = "", []
        for j, part in enumerate(re.split(r"\{(\w+)\}", template)):
            if j % 2 == 0:
                text += part.lower() if lower else part
                continue
            etype, v = value(part) or ("", "")
            v = v.lower() if lower else v
            spans.append({"type": etype, "value": v, "start": len(text), "end": len(text) + len(v)})
            text += v
        rows.append({"text": text, "spans": spans, "template_id": 1000 + i % len(OWN_TEMPLATES)})
    return rows


def split_templates(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """(rest, held out): ``fraction`` of the distinct ``template_id`` s, drawn with ``seed``."""
    import random

    ids = sorted({r.get("template_id", -1) for r in rows})
    held = set(random.Random(seed).sample(ids, max(1, round(fraction * len(ids)))))
    rest = [r for r in rows if r.get("template_id", -1) not in held]
    return rest, [r for r in rows if r.get("template_id", -1) in held]


def holdout_report(rows: list[dict], fraction: float, seed: int, show_leaks: int) -> int:
    """Leak rates on held-out templates next to the rest: a check for rules fitted to templates."""
    rest, held = split_templates(rows, fraction, seed)
    sanitizer = Sanitizer()
    a, b = evaluate(sanitizer, rest, 0, 0), evaluate(sanitizer, held, show_leaks, 0)
    print(
        f"templates: {len(rows)} texts; held out {fraction:.0%} of templates (seed {seed}): "
        f"{len(held)} texts vs {len(rest)}"
    )
    print(f"{'entity type':16s} {'n rest':>6s} {'leak':>7s} {'n held':>6s} {'leak':>7s} {'goal':>6s}")
    for etype in sorted(set(a["totals"]) | set(b["totals"]), key=lambda t: -(a["totals"].get(t, 0))):
        goal = GOALS.get(etype)
        print(
            f"{etype:16s} {a['totals'].get(etype, 0):6d} {a['leak'].get(etype, 0.0):7.1%} "
            f"{b['totals'].get(etype, 0):6d} {b['leak'].get(etype, 0.0):7.1%} "
            + (f"{goal:6.0%}" if goal is not None else "     -")
        )
    for key, label in (("over_redaction", "over-redaction"), ("round_trip", "exact round trip")):
        print(f"{label:18s} {a[key]:7.2%}   held out {b[key]:7.2%}")
    for etype, examples in b["examples"].items():
        for ex in examples:
            print(f"  held-out leak {etype}: {ex}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "pii" / "dev.jsonl")
    ap.add_argument("--no-anchor", action="store_true", help="skip the stock-presidio anchor run")
    ap.add_argument("--show-leaks", type=int, default=0, help="print up to N leaked values per type")
    ap.add_argument("--repeats", type=int, default=3, help="timing passes (best is reported)")
    ap.add_argument(
        "--holdout",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="also report leak rates on this fraction of templates (by template_id) against the rest",
    )
    ap.add_argument("--seed", type=int, default=0, help="seed of --holdout and --own-templates")
    ap.add_argument(
        "--resample",
        type=int,
        default=None,
        metavar="SEED",
        help="replace every labelled value with a fresh Faker value of its type (seeded)",
    )
    ap.add_argument(
        "--own-templates",
        type=int,
        default=0,
        metavar="N",
        help="evaluate N texts from templates written for this check instead of --data",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.own_templates:
        rows = own_template_rows(args.own_templates, args.seed)
        args.data = Path(f"<{args.own_templates} texts from own templates, seed {args.seed}>")
    else:
        rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    if args.resample is not None:
        rows = resample_values(rows, args.resample)
        args.data = Path(f"{args.data} (values resampled, seed {args.resample})")
    if args.holdout:
        return holdout_report(rows, args.holdout, args.seed, args.show_leaks)
    t0 = time.perf_counter()
    ours = evaluate(Sanitizer(), rows, args.show_leaks, args.repeats)
    print(f"data: {args.data} ({len(rows)} texts); setup+run {time.perf_counter() - t0:.1f} s")
    anchor = None if args.no_anchor else evaluate(Sanitizer(AnchorDetector()), rows, 0, args.repeats)
    print(f"{'entity type':16s} {'n':>5s} {'leak':>7s} {'goal':>6s}" + ("" if anchor is None else f" {'anchor':>7s}"))
    for etype in sorted(ours["totals"], key=lambda t: -ours["totals"][t]):
        goal = GOALS.get(etype)
        line = f"{etype:16s} {ours['totals'][etype]:5d} {ours['leak'][etype]:7.1%} " + (
            f"{goal:6.0%}" if goal is not None else "     -"
        )
        if anchor is not None:
            line += f" {anchor['leak'][etype]:7.1%}"
        if goal is not None:
            line += "  ok" if ours["leak"][etype] <= goal else "  MISSED"
        print(line)
    for key, label in (("over_redaction", "over-redaction"), ("round_trip", "exact round trip")):
        print(f"{label:18s} {ours[key]:7.2%}" + ("" if anchor is None else f"   anchor {anchor[key]:7.2%}"))
    for key, label in (("ms_per_kb_wall", "ms per KB (wall)"), ("ms_per_kb_cpu", "ms per KB (CPU)")):
        line = f"{label:18s} {ours[key]:7.3f}"
        if anchor is not None:
            line += f"   anchor {anchor[key]:7.3f}   ratio {ours[key] / anchor[key]:.2f}x"
        print(line + ("   goal <= 2" if key == "ms_per_kb_wall" else ""))
    for etype, examples in ours["examples"].items():
        for ex in examples:
            print(f"  leak {etype}: {ex}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
